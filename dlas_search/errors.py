"""Errors the command line turns into exit codes (2 = bad input, nothing written; see
docs/architecture.md)."""
import difflib

__all__ = ["BadInput", "allowed"]


class BadInput(ValueError):
    """The user's input (YAML, flag, URL, path) is wrong; the message says what is allowed."""


def allowed(key: str, value, choices) -> BadInput:
    """A BadInput naming the key, the bad value and the allowed values, with the closest
    allowed value when one is near (a typo: `epoch` -> did you mean 'epochs'?)."""
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(value), choices, n=1) if isinstance(value, str) else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return BadInput(f"{key}: {value!r} is not allowed{hint}; allowed: {', '.join(choices)}")
