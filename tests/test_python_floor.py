"""The lint that `make test`, `make test-fast` and `make lint` run rejects syntax newer than the Python floor.

pyproject.toml declares `requires-python = ">=3.X"`; ruff, with `target-version` at that floor, reports syntax a
newer Python added as `invalid-syntax`, an error no ignore list can hide. Each snippet below is tagged with the
release that first accepts it (the PEP or the "What's New" entry), so the test fails if the ruff configuration drifts
above the floor, or if an installed ruff is too old to see one of them, and also if it drifts below (3.10's own
syntax must pass).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SNIPPETS = {
    "match statement (PEP 634)": ((3, 10), "def f(x):\n    match x:\n        case 1:\n            return 1\n"),
    "parenthesized context managers": ((3, 10), "with (open('a') as a, open('b') as b):\n    pass\n"),
    "except* (PEP 654)": ((3, 11), "try:\n    pass\nexcept* ValueError:\n    pass\n"),
    "star expression in an index (PEP 646)": ((3, 11), "def f(a, *b):\n    return a[*b]\n"),
    "star annotation on *args (PEP 646)": ((3, 11), "def f(*ts: *tuple[int, ...]):\n    pass\n"),
    "async comprehension inside a comprehension": (
        (3, 11), "async def f(xs):\n    return [[y async for y in x] for x in xs]\n"),
    "type parameter list (PEP 695)": ((3, 12), "def f[T](x: T) -> T:\n    return x\n"),
    "type statement (PEP 695)": ((3, 12), "type Alias = int\n"),
    "f-string reusing its quote (PEP 701)": ((3, 12), 'def f(d):\n    return f"{d["k"]}"\n'),
    "backslash in an f-string expression (PEP 701)": ((3, 12), "def f(x):\n    return f\"{'\\n'.join(x)}\"\n"),
    "line break in a one-quote f-string field (PEP 701)": ((3, 12), 'def f(x):\n    return f"{x\n    }"\n'),
    "type parameter default (PEP 696)": ((3, 13), "def f[T = int](x: T) -> T:\n    return x\n"),
    "unparenthesized except types (PEP 758)": (
        (3, 14), "try:\n    pass\nexcept ValueError, TypeError:\n    pass\n"),
    "template string (PEP 750)": ((3, 14), 'def f(name):\n    return t"hi {name}"\n'),
}


def python_floor() -> tuple[int, int]:
    text = (REPO / "pyproject.toml").read_text()
    found = re.search(r'^requires-python\s*=\s*">=\s*(\d+)\.(\d+)"', text, re.MULTILINE)
    assert found, "pyproject.toml: no requires-python = \">=X.Y\" line"
    return int(found[1]), int(found[2])


def syntax_errors(source: str) -> list[str]:
    """ruff's `invalid-syntax` messages for `source`, checked with this repository's configuration."""
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--output-format", "json", "--stdin-filename",
         "tests/python_floor_probe.py", "-"],
        input=source, capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert done.returncode in (0, 1), done.stderr
    return [d["message"] for d in json.loads(done.stdout) if d["code"] == "invalid-syntax"]


@pytest.mark.parametrize("name", SNIPPETS)
def test_lint_rejects_exactly_the_syntax_newer_than_the_floor(name):
    since, source = SNIPPETS[name]
    errors = syntax_errors(source)
    if since > python_floor():
        assert errors, f"ruff check accepts {name}, syntax of Python {since[0]}.{since[1]}, above the floor"
    else:
        assert not errors, f"ruff check rejects {name}, syntax the floor accepts: {errors}"
