"""Tests of the compression package's modules that have a file of their own (the worked
example of adding a technique: random.py)."""
