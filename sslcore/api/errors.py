"""Errors that are the user's to fix: printed as one line each, exit code 2, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """An error in the user's input (experiment file, command line, data, plugin).

    ``lines`` are printed one per line; each should name the file, the key and the fix.
    """

    def __init__(self, *lines: str) -> None:
        super().__init__("\n".join(lines))
        self.lines = list(lines)


class ConfigError(UserError):
    """The experiment file or its overrides do not validate."""


class PluginError(UserError):
    """A plugin cannot be used (clash of names, module not importable)."""


class TrainingError(UserError):
    """Training cannot go on for a reason the user can fix (a NaN loss, an empty dataset)."""


class UnreadableImage(Exception):
    """An image file that cannot be decoded; sslcore's loader logs it and skips to the next item."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)  # both in args, so the exception pickles (DataLoader workers, Ray)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"
