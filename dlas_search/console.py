"""Lines for the person watching a study: on stderr, without tearing its progress bar, each
prefixed with the worker that says it (`[worker 2] `) when there are several."""
from __future__ import annotations

import sys

__all__ = ["PREFIX", "say"]

PREFIX = ""  # "[worker i] " in a worker process


def say(line: str) -> None:
    """One line on stderr that does not tear the study's progress bar."""
    from tqdm import tqdm
    tqdm.write(PREFIX + line, file=sys.stderr)
