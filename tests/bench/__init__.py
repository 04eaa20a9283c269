"""Tests of the bench/ scripts. A package, so that tests/bench/test_compiler.py and a future
tests/test_compiler.py do not collide (pytest's default import mode keys modules by basename)."""
