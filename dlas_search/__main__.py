"""`python -m dlas_search`: the `dlas` command."""
import sys

from .cli import main

__all__: list[str] = []

sys.exit(main())
