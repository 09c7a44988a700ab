"""README.md is generated from `nbs/index.ipynb`: its Markdown cells, with links made relative to the repository root.

`python docs/readme.py` writes README.md; `python docs/readme.py --check` exits 1 when README.md is not what the
notebook makes (tests/test_docs_site.py checks the same). nbdev's own `nbdev_readme` needs Quarto, hence this."""
import posixpath
import re
import sys
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]
INDEX, README = REPO/"nbs"/"index.ipynb", REPO/"README.md"
HEADER = "<!-- Generated from nbs/index.ipynb by docs/readme.py: edit the notebook, then `python docs/readme.py`. -->"
# a Markdown link or image whose target is a relative path (not a URL, not an anchor)
RELATIVE_LINK = re.compile(r"(!?\[[^\]]*\]\()(?![a-z]+://|#|/)([^)\s]+)\)")


def from_nbs(target: str) -> str:
    "A link target relative to nbs/ made relative to the repository root."
    return posixpath.normpath(f"nbs/{target}")


def readme_text() -> str:
    "README.md as `nbs/index.ipynb` makes it."
    nb = nbformat.read(INDEX, as_version=4)
    cells = [c.source.strip() for c in nb.cells if c.cell_type == "markdown"]
    body = "\n\n".join(RELATIVE_LINK.sub(lambda m: f"{m[1]}{from_nbs(m[2])})", c) for c in cells)
    return f"{HEADER}\n{body}\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        if README.read_text() != readme_text(): sys.exit(f"{README} is not what {INDEX} makes: python docs/readme.py")
    else: README.write_text(readme_text())
