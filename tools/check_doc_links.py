"""Check that every relative link in the repository's (tracked) Markdown files resolves: the target file
exists and, for `file.md#anchor`, the anchor is one of its headings (GitHub's slugs).

    python tools/check_doc_links.py        # prints each broken link; exit 1 if any
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"```.*?```", re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#+\s+(.*)$", re.M)


def slug(heading: str) -> str:
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(FENCE.sub("", path.read_text()))}


def broken(path: Path) -> list[str]:
    found = []
    for target in LINK.findall(FENCE.sub("", path.read_text())):
        if re.match(r"^[a-z]+:", target):  # http(s)://, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            found.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            found.append(f"{target}: no such heading")
    return found


def main() -> int:
    listed = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()  # tracked files only
    files = [ROOT / name for name in listed]
    bad = [f"{p.relative_to(ROOT)}: {b}" for p in files for b in broken(p)]
    print("\n".join(bad) or f"{len(files)} Markdown files, every relative link resolves")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
