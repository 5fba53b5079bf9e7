"""Errors the user can act on. Each names the file, the episode and the key where it applies."""

from __future__ import annotations


class RynnError(Exception):
    """Base class for errors shown to the user as one clear message (no traceback)."""


class DataError(RynnError):
    """Bad input data: missing file or key, wrong shape or dtype, NaN/inf, truncated, empty."""

    def __init__(self, msg: str, *, file: str | None = None, episode: str | None = None,
                 key: str | None = None) -> None:
        where = ", ".join(f"{k}={v}" for k, v in
                          (("file", file), ("episode", episode), ("key", key)) if v)
        super().__init__(f"{msg} [{where}]" if where else msg)
        self.file, self.episode, self.key = file, episode, key


class StageError(RynnError):
    """A stage refused to produce output (e.g. a filter that would drop too much)."""


class BadJSON(DataError, ValueError):
    """A JSON input file that does not parse (a ValueError too, for code that catches those)."""
