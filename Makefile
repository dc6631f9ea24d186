# The two commands a new user runs: `make demo` (the main job on the embedded default) and `make test`.
# Both create .venv on first use. torch is pinned and installed first: torch==2.13.0 takes the local
# CPU build, while an unpinned torch (asked for by any later package) would pull gigabytes of CUDA.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint models data clean browser

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The five-stage curriculum on the embedded data, evaluation and grids: outputs/demo/summary.json (~20 min).
demo: $(STAMP)
	$(BIN)/python -m scripts.demo

# The whole suite (CI runs this: .ci/run); the 15 slowest tests are listed at the end, so a slow newcomer shows.
test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=15

# The edit-test loop: every test not marked slow or gpu (README, "Tests").
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

# The Gradio app's browser test drives a headless Chromium. Installed here where this user may (root with apt-get,
# as in CI); elsewhere the test is skipped with the command to run (README, "Tests").
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing Debian's chromium for the browser test"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
				|| echo "note: could not install chromium: the browser test is skipped"; \
		else \
			echo "note: no /usr/bin/chromium: the browser test is skipped (install: sudo apt-get install -y chromium)"; \
		fi; \
	fi

# What every embedded stage reads (experiment=embedded), as latent shards under outputs/data: what `make demo` builds.
# scripts/tools/build_embedded_data.sh builds other sets too (its header: DATASETS, SIZES, KINDS).
data: $(STAMP)
	scripts/tools/build_embedded_data.sh outputs/data

lint: $(STAMP)
	$(BIN)/ruff check .

models: $(STAMP)
	$(BIN)/python -m models

clean:
	rm -rf outputs .pytest_cache
