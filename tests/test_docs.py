"""The README's table of parameters lists what the registry holds: a choice added as a module
(a technique, a primitive, a dataset, a sampler) fails here until the README names it, and the
README names nothing that is not registered. Every relative link in the docs resolves."""
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from dlas_search import registry
import dlas_search.space  # noqa: F401  (imports every layer, so every choice is registered)

README = (ROOT / "README.md").read_text()
# the registries whose names the README's parameter table lists, by the key the YAML uses
TABLE_KEYS = ("data.name", "compress.method", "algo.conv", "algo.format", "algo.block",
              "compiler.backend", "compiler.tuner")


def row_of(key: str) -> str:
    """The text the README's parameter table gives `key`: from its name to the next key."""
    start = README.index(f"`{key}` (")
    following = re.search(r", `[a-z]+\.[a-z_]+` \(|\|", README[start + len(key) + 3:])
    return README[start:start + len(key) + 3 + following.start()]


@pytest.mark.parametrize("key", TABLE_KEYS)
def test_the_readme_lists_every_registered_choice(key):
    listed = set(re.findall(r"`([A-Za-z0-9_+]+)`", row_of(key)))
    names = set(registry.REGISTRIES[key].names())
    assert names <= listed, f"{key}: registered but not in the README: {names - listed}"


def test_the_readme_lists_every_sampler():
    line = next(li for li in README.splitlines() if li.startswith("- **Samplers**"))
    text = line + README.split(line, 1)[1].split("\n- ", 1)[0]
    assert set(registry.REGISTRIES["sampler"].names()) <= set(re.findall(r"`(\w+)`", text))


def test_every_relative_link_in_the_docs_resolves():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "check_doc_links.py")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
