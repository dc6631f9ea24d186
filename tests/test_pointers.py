"""Every pointer into this repository that a comment, a docstring or a document makes still points somewhere.

A pointer is a path of the repository (`trainer/loop.py`, `configs/stage2.yaml`, `scripts/demo/ablation.py`, a root
file such as `reparameterize.py`), optionally followed by `:name` (a function, class or module-level name defined
there) or `:line` (a line the file has). They are read from Python comments and docstrings (not from other strings:
code that opens a path fails on its own), from YAML comments and from the Markdown documents. Paths into other
projects are not pointers here: a path counts only when its first component is one of this repository's top-level
files or folders, or when a bare `file.py:name` names a file whose basename is unique in the repository.
"""

import ast
import io
import re
import subprocess
import tokenize
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = r"py|yaml|md|sh|sbatch|json|safetensors|toml|txt|png"
PATH = re.compile(rf"(?<![\w./-])((?:[\w-]+/)+[\w.-]+\.(?:{SUFFIXES})|[\w-]+\.(?:py|yaml|sh|sbatch|toml))"
                  r"(?::([A-Za-z_]\w*|\d+))?(?![\w/])")


@cache
def tracked() -> tuple[str, ...]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return tuple(line for line in out.splitlines() if (ROOT / line).exists())


@cache
def top_level() -> frozenset[str]:
    return frozenset(name.split("/", 1)[0] for name in tracked())


@cache
def by_basename() -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for name in tracked():
        names.setdefault(Path(name).name, []).append(name)
    return names


def python_text(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python file."""
    source = path.read_text()
    found = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                found.append((body[0].lineno, body[0].value.value))
        # An attribute's docstring: a string statement right after an assignment (the repo's convention).
        statements = getattr(node, "body", None)
        if not isinstance(statements, list):  # a lambda's or an if-expression's body
            continue
        for first, second in zip(statements[:-1], statements[1:], strict=False):
            if isinstance(first, ast.Assign | ast.AnnAssign) and isinstance(second, ast.Expr) \
                    and isinstance(second.value, ast.Constant) and isinstance(second.value.value, str):
                found.append((second.lineno, second.value.value))
    return found


def texts(name: str) -> list[tuple[int, str]]:
    path = ROOT / name
    if name.endswith(".py"):
        return python_text(path)
    lines = path.read_text().splitlines()
    if name.endswith((".yaml", ".sh", ".sbatch", ".toml")) or Path(name).name == "Makefile":
        return [(i + 1, line[line.index("#"):]) for i, line in enumerate(lines) if "#" in line]
    return list(enumerate(lines, 1))  # Markdown: all of it


@cache
def defines(name: str, symbol: str) -> bool:
    """Whether `symbol` is defined in the file: a function, class, module-level or class-level name, a method."""
    path = ROOT / name
    if path.suffix != ".py":
        return re.search(rf"^\s*{re.escape(symbol)}\s*:", path.read_text(), re.M) is not None  # a YAML key
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == symbol:
            return True
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == symbol for t in targets):
            return True
        if isinstance(node, ast.ImportFrom | ast.Import) and any((a.asname or a.name) == symbol for a in node.names):
            return True
    return False


def resolve(pointer: str, source: str) -> str | None:
    """The tracked path a pointer names, None when it is not a pointer into this repository. A Hydra config may be
    named from inside configs/ (`experiment/embedded.yaml`); `stageN` stands for each stage's file (the first)."""
    first = pointer.split("/", 1)[0]
    if "/" in pointer and first not in top_level():
        if (ROOT / "configs" / first).is_dir():
            pointer = f"configs/{pointer}"
        else:  # relative to the file that points, or another project's path
            relative = (Path(source).parent / pointer).as_posix()
            if relative.split("/", 1)[0] not in top_level() or not (ROOT / relative).exists():
                return None
            pointer = relative
    elif "/" not in pointer:
        matches = by_basename().get(pointer, [])
        if len(matches) != 1:
            return pointer if pointer in top_level() else None
        pointer = matches[0]
    if re.search(r"[a-z]N[./]", pointer):
        found = sorted(ROOT.glob(re.sub(r"(?<=[a-z])N(?=[./])", "[0-9]", pointer)))
        return found[0].relative_to(ROOT).as_posix() if found else pointer
    return pointer


def problems_in(name: str, line: int, text: str) -> list[str]:
    """The stale pointers of one comment, docstring or line of a document."""
    problems = []
    for match in PATH.finditer(text):
        pointer, symbol = match[1], match[2]
        if "/" not in pointer and (symbol is None or symbol.isdigit()):
            continue  # a bare file name alone is prose ("the loop in loop.py"); with a line, often another
            # project's file (tests/te_standin.py cites Transformer Engine's): too ambiguous to check
        target = resolve(pointer, name)
        if target is None:
            continue
        if not (ROOT / target).exists():
            problems.append(f"{name}:{line}: {match[0]} (no such file)")
        elif symbol is None or (ROOT / target).is_dir():
            continue
        elif symbol.isdigit():
            if int(symbol) > len((ROOT / target).read_text().splitlines()):
                problems.append(f"{name}:{line}: {match[0]} (the file has fewer lines)")
        elif target.endswith((".py", ".yaml")) and not defines(target, symbol):
            problems.append(f"{name}:{line}: {match[0]} ({symbol} is not defined there)")
    return problems


def test_every_pointer_into_the_repository_exists():
    problems = [problem
                for name in tracked()
                if name != "tests/test_pointers.py"
                and (name.endswith((".py", ".yaml", ".md", ".sh", ".sbatch", ".toml")) or Path(name).name == "Makefile")
                for line, text in texts(name)
                for problem in problems_in(name, line, text)]
    assert not problems, f"{len(problems)} stale pointers:\n" + "\n".join(problems)


@pytest.mark.parametrize("text, stale", [
    ("see trainer/loop.py:Trainer and planner/plan.py:make_plan", 0),
    ("see trainer/loop.py:NoSuchThing", 1),
    ("see trainer/no_such_file.py and configs/experiment/nowhere.yaml", 2),
    ("experiment/embedded.yaml and configs/stageN.yaml", 0),  # inside configs/; a placeholder for each stage
    ("transformer_engine/pytorch/module/linear.py:1924, distributed.py:659", 0),  # another project's paths
    ("trainer/loop.py:100000", 1),
])
def test_the_checker_tells_a_stale_pointer(text, stale):
    """The checker on its own inputs: real names pass, a missing file, name or line is found, foreign paths are left."""
    assert len(problems_in("README.md", 1, text)) == stale, problems_in("README.md", 1, text)
