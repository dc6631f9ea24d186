"""The README's code blocks that a user copies run as printed, each in a fresh process.

A block is tested when the line before its opening fence is a comment that starts with `<!-- tested` (invisible
where the README is rendered). Every tested block, bash or python, runs in document order in one working folder
laid out as a checkout: the repository's tracked top-level entries and its virtual environment linked in, and a
tiny checkpoint (tests/conftest.py's two-step runs) at every `outputs/embedded/stageN` path the blocks name, a class
checkpoint for Stage 1 and a text one for the others. So a later block may use what an earlier one wrote (the
export, then the snippet that loads it), and marking a new block is all it takes to test it.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- tested"
FENCE = re.compile(r"^```(\w+)\s*$")
RUN_PATH = re.compile(r"outputs/embedded/stage(\d+)(?:/checkpoints/(step_\d+\.pt))?")
RUNNERS = {"bash": ["bash", "-e", "-o", "pipefail", "-c"], "python": [".venv/bin/python", "-c"]}


def marked_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, code, line number of the fence) of every block marked tested, in document order."""
    lines, blocks = text.splitlines(), []
    for i, line in enumerate(lines[:-1]):
        if not line.startswith(MARK):
            continue
        fence = FENCE.match(lines[i + 1])
        assert fence, f"README.md line {i + 1}: {MARK} must sit on the line before a fence with a language"
        end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
        blocks.append((fence[1], "\n".join(lines[i + 2 : end]) + "\n", i + 2))
    return blocks


BLOCKS = marked_blocks((ROOT / "README.md").read_text())


def test_the_readme_marks_the_blocks_users_copy():
    """At least the sampling commands, the export command and the snippet that loads an export are marked, in
    languages the test can run."""
    code = "\n".join(code for _, code, _ in BLOCKS)
    assert "-m app.sample" in code and "-m app.export" in code and "RFDiTPipeline.from_pretrained" in code
    assert all(language in RUNNERS for language, _, _ in BLOCKS), [language for language, _, _ in BLOCKS]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, stage1_checkpoint, stage2_checkpoint) -> Path:
    root = tmp_path_factory.mktemp("checkout")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in sorted({line.split("/", 1)[0] for line in tracked.splitlines()}):
        (root / name).symlink_to(ROOT / name)
    if sys.prefix != sys.base_prefix:  # the virtual environment running the tests (.venv under `make test`)
        (root / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    else:  # a plain interpreter: a bin/python link to it is enough
        (root / ".venv" / "bin").mkdir(parents=True)
        (root / ".venv" / "bin" / "python").symlink_to(sys.executable)
    for stage, name in RUN_PATH.findall("\n".join(code for _, code, _ in BLOCKS)):
        source = stage1_checkpoint if stage == "1" else stage2_checkpoint
        target = root / "outputs" / "embedded" / f"stage{stage}" / "checkpoints" / (name or source.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copy(source, target)
    return root


def test_every_tested_readme_block_runs_as_printed(checkout):
    """Each block as printed, in a fresh process, from the checkout's root. PYTHONPATH names that root, as an
    editable install names a user's checkout, so the scripts import the code beside them."""
    env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS="1")
    for language, code, line in BLOCKS:
        run = subprocess.run([*RUNNERS[language], code], cwd=checkout, env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, f"README.md line {line} ({language}) failed:\n{code}\n{run.stderr[-3000:]}"
    assert (checkout / "exported" / "model_index.json").is_file() and (checkout / "outputs" / "samples").is_dir()
