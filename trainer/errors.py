"""Errors a user can fix: the entrypoints print their message as one line and exit non-zero (trainer/cli.py);
anything else is a bug and keeps its traceback.

Each subclasses the builtin exception callers and tests already expect (ValueError, FileNotFoundError,
RuntimeError), so catching those keeps working.
"""


class UserError(Exception):
    """Marker: the message names the key, file or value and what is expected; no traceback needed."""


class ConfigError(UserError, ValueError):
    """A config value, or a combination of values, that cannot work; names the key."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder a key names does not exist or holds nothing usable."""


class RunStoppedError(UserError, RuntimeError):
    """The run stopped itself (e.g. too many non-finite steps); says where the last good checkpoint is."""
