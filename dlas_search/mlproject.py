"""MLproject entry points: MLflow passes every `-P` parameter, empty when not given. Drop the
empty ones, turn switches (`reduced=true`) into flags, split `set` ("a=1 b=2" or "a=1,b=2")
into --set flags, and call the `dlas` CLI."""
from __future__ import annotations

import re
import sys

from .cli import main

__all__ = ["SWITCHES", "translate"]


SWITCHES = ("--reduced",)


def translate(argv: list[str]) -> list[str]:
    out: list[str] = [argv[0]]
    i = 1
    while i < len(argv):
        flag = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) else ""
        i += 2
        if value.strip() == "":
            continue
        if flag in SWITCHES:  # a boolean switch: -P reduced=true
            if value.strip().lower() in ("true", "1", "yes"):
                out.append(flag)
            elif value.strip().lower() not in ("false", "0", "no"):
                out += [flag, value]  # argparse refuses it, naming the flag
            continue
        if flag == "--set":
            for item in re.split(r"[\s,]+(?=[\w.]+=)", value.strip()):
                out += ["--set", item.strip()]
        else:
            out += [flag, value]
    return out


if __name__ == "__main__":
    sys.exit(main(translate(sys.argv[1:])))
