"""Every command line shows each flag's default in --help, once, from argparse alone (no torch import)."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from core.cli_help import HelpFormatter

ROOT = Path(__file__).resolve().parents[1]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="x", description="Examples:\n    x --steps 3\n", formatter_class=HelpFormatter)
    p.add_argument("--steps", type=int, default=24, help="ODE steps")
    p.add_argument("--device", default=None, help="torch device")
    p.add_argument("--alpha", type=float, default=1.0, help="warp (default: the checkpoint's)")
    p.add_argument("--label", action="append", default=[], help="a label")
    p.add_argument("--fresh", action="store_true", help="start over")
    return p


def test_defaults_shown_once_and_only_where_they_say_something():
    text = " ".join(parser().format_help().split())
    assert "ODE steps (default: 24)" in text
    assert "torch device (default" not in text and "a label (default" not in text and "over (default" not in text
    assert text.count("default") == 2  # the alpha help names its own default; argparse adds none beside it
    assert "Examples:\n    x --steps 3" in parser().format_help()  # the description keeps its layout


LAZY = [("module", "app.sample"), ("module", "app.gradio_app"), ("module", "evaluation.evaluate"),
        ("module", "evaluation.sample_many"), ("path", "reparameterize.py"), ("module", "data.validate"),
        ("module", "models"), ("module", "planner"), ("module", "data.make_shards"),
        ("path", "train_stage1.py")]


@pytest.mark.slow
@pytest.mark.parametrize("kind, name", LAZY, ids=[n for _, n in LAZY])
def test_help_answers_without_importing_torch(kind, name):
    """--help of the commands people type first prints its text (with defaults) before torch is imported."""
    code = (f"import runpy, sys\nsys.argv = [{name!r}, '--help']\ntry:\n    runpy.run_{kind}({name!r}, "
            "run_name='__main__')\nexcept SystemExit:\n    pass\nprint('torch imported:', 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower() or "--help" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "torch imported: False"


def test_stage_help_documents_every_key_of_the_schema():
    """`train_stageN.py --help` is where each key's documentation is read (the schema's docstrings; configs/ say only
    what a stage changes): every leaf field of the schema, walked from its dataclasses, is listed with a description."""
    from dataclasses import fields, is_dataclass

    from trainer.cli import stage_help
    from trainer.config import RunConfig

    def leaves(schema: type, prefix: str = "") -> list[str]:
        keys = []
        for f in fields(schema):
            default = f.default_factory() if callable(f.default_factory) else None
            keys += leaves(type(default), f"{prefix}{f.name}.") if is_dataclass(default) else [f"{prefix}{f.name}"]
        return keys

    lines = {line.split(" = ")[0].strip(): line for line in stage_help("stage2", [], "Stage 2").splitlines()
             if line.startswith("  ") and " = " in line}
    for key in leaves(RunConfig):
        assert key in lines, f"{key} is not in --help"
        assert not lines[key].endswith(" "), f"{key} has no documentation in --help: {lines[key]!r}"
