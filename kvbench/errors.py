"""User errors: bad input that ends in one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import difflib


class UserError(Exception):
    """A problem with what the user asked for (config, files, hardware), not a bug in kvbench."""


class ConfigError(UserError):
    """A bad benchmark config; the message names the exact place, e.g. `methods[2].params.bits`."""


def did_you_mean(name: str, choices) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
