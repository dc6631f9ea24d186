# The two commands a new user runs: `make demo` (the main job on the embedded default) and `make test`.
# Both create .venv on first use. torch is pinned and installed first: torch==2.13.0 takes the local
# CPU build, while an unpinned torch (asked for by any later package) would pull gigabytes of CUDA.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint models data clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The five-stage curriculum on the embedded data, evaluation and grids: outputs/demo/summary.json (~20 min).
demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The embedded datasets (synthetic scenes, OpenMoji) as latent shards under outputs/data (~3 min).
data: $(STAMP)
	scripts/build_embedded_data.sh outputs/data

lint: $(STAMP)
	$(BIN)/ruff check .

models: $(STAMP)
	$(BIN)/python -m models

clean:
	rm -rf outputs .pytest_cache
