"""Errors the command line turns into exit codes (DESIGN.md: 2 = bad input, nothing written)."""


class BadInput(ValueError):
    """The user's input (YAML, flag, URL, path) is wrong; the message says what is allowed."""


def allowed(key: str, value, choices) -> BadInput:
    """A BadInput naming the key, the bad value and the allowed values."""
    return BadInput(f"{key}: {value!r} is not allowed; allowed: {', '.join(map(str, choices))}")
