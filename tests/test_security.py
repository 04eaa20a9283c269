"""Security properties of the package's code that a reading can check: no configuration value
reaches a shell or `eval`, YAML is only safe-loaded, checkpoints load with weights_only=True,
and the package starts no server on a public interface. (What the user sees when the YAML or
a checkpoint carries code is in test_bad_input.py.)"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dlas_search"
# our own stage-cache files (written by this package, under --cache-dir) are whole pickles:
# cache.py's stage entries and compiler.py's build report of a cached compiled module
TRUSTED_PICKLES = {"cache.py", "compiler.py"}


def calls():
    """(file path in the package, call node) for every call in the package, subpackages
    included."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                yield str(path.relative_to(PACKAGE)), node


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_scanner_sees_the_calls_it_looks_for():
    """The scan below is only worth something if it finds calls: it must see the package's
    safe_load and torch.load calls."""
    names = [dotted(c.func) for _, c in calls()]
    assert "yaml.safe_load" in names and "torch.load" in names


def test_no_eval_exec_or_shell():
    found = [(f, dotted(c.func), c.lineno) for f, c in calls()
             if dotted(c.func) in ("eval", "exec", "compile", "os.system", "os.popen",
                                   "subprocess.getoutput", "subprocess.getstatusoutput")
             or (dotted(c.func).startswith("subprocess.")
                 and isinstance(keyword(c, "shell"), ast.Constant) and keyword(c, "shell").value)]
    assert found == []


def test_subprocesses_take_fixed_argument_lists():
    """The one subprocess (git rev-parse for the run's tag) gets a literal list: no
    configuration value is ever part of a command line."""
    runs = [(f, c) for f, c in calls() if dotted(c.func).startswith("subprocess.")]
    for f, c in runs:
        assert isinstance(c.args[0], ast.List), (f, c.lineno)
        assert all(isinstance(e, ast.Constant) for e in c.args[0].elts), (f, c.lineno)


def test_yaml_is_only_safe_loaded():
    unsafe = [(f, c.lineno) for f, c in calls()
              if dotted(c.func) in ("yaml.load", "yaml.unsafe_load", "yaml.full_load",
                                    "yaml.load_all", "yaml.unsafe_load_all")]
    assert unsafe == []


def test_checkpoints_load_with_weights_only():
    loads = [(f, c) for f, c in calls() if dotted(c.func) == "torch.load"]
    assert loads
    for f, c in loads:
        flag = keyword(c, "weights_only")
        safe = isinstance(flag, ast.Constant) and flag.value is True
        assert safe or f in TRUSTED_PICKLES, (f, c.lineno)


@pytest.mark.parametrize("public", ["0.0.0.0", "::"])
def test_no_server_on_a_public_interface(public):
    """The package starts no server of its own; none may bind every interface."""
    found = [(p.name, n.lineno) for p in PACKAGE.glob("*.py")
             for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Constant)
             and n.value == public]
    assert found == []
