"""One help layout for every command line of the repo (argparse only: `--help` stays instant)."""

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring's examples kept as written, and each flag's default shown where it has one its help
    does not already name (argparse's ArgumentDefaultsHelpFormatter would also print "default: None" and
    repeat defaults a help text states in words)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, [], (), argparse.SUPPRESS) and action.option_strings
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text
