"""Every command line shows each flag's default in --help, once, from argparse alone (no torch import)."""

import argparse

from core.cli_help import HelpFormatter


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
