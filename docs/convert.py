"""The notebooks as Jupyter Book pages: nbdev's own processing, then nbdev's directives as Jupyter Book cell tags.

`python docs/convert.py DEST` writes into DEST one page per notebook under `nbs/` (the index, the guides, the top-level
notebooks and every library notebook, at the same relative path), the table of contents `_toc.yml`, the book's
`_config.yml`, `static/` (the vendored MathJax) and `images/`. Each notebook goes through nbdev's processors
(`FilterDefaults`, as `nbdev_docs` does before Quarto renders): `show_doc` cells are evaluated against the installed
package, exported and hidden cells dropped. Then this module maps what Quarto would have read to what Jupyter Book
reads: directives become tags, `show_doc` output becomes a Markdown section with a target, nbdev's links to its
Quarto site become links to those targets. The notebooks whose outputs the site shows come from their executed
copies in `docs/executed/`; nothing is executed here but what nbdev's processing runs for `show_doc` (the cells
with imports, the exported cells and the `show_doc` cells).
"""
import os
import re
import shutil
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nbformat
import yaml
from execnb.nbio import mk_cell, read_nb
from nbdev.config import get_config
from nbdev.process import extract_directives
from nbdev.processors import FilterDefaults, insert_warning

REPO = Path(__file__).resolve().parents[1]
NBS, DOCS = REPO/"nbs", REPO/"docs"
EXECUTED = DOCS/"executed"
# nbs/ sub-folders in the order the package is layered (tests/test_layering.py), lowest first
PACKAGES = ["core", "slides", "bags", "models", "evaluate", "train", "serve", "score", "cloud", "bench", "cli"]
GUIDES = ["train_on_your_slides", "evaluation", "score_a_cohort", "serve_and_deploy", "sagemaker", "panda_at_scale",
          "pretrained_encoders", "benchmarks"]  # nbs/guides/, in reading order
TOP_LEVEL = ["train", "predict", "compare_pooling", "compare_recipe", "reproduce_mnist_bags", "benchmark_results"]
TAGS = {("echo", "false"): "remove-input", ("output", "false"): "remove-output", ("include", "false"): "remove-cell"}
# nbdev's show_doc ends a link with Quarto's attributes, `[source](...){target="_blank" style="..."}`
QUARTO_ATTRIBUTES = re.compile(r"(\]\([^)]*\))\{[^}]*\}")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$", re.MULTILINE)
IMAGES = re.compile(r"\]\((?:\.\./)+docs/images/")  # a notebook's link into docs/images/, copied to the book's images/
NOTEBOOK = re.compile(r"(?<!\[)`nbs/([\w/]+\.ipynb)`")  # a notebook named in code, `nbs/models/10_model.ipynb`


def cell_tags(directives: dict) -> list:
    "Jupyter Book tags for a code cell's nbdev directives (`{'echo:': ['false'], 'hide': []}` as nbdev parses them)."
    tags = [TAGS[key.rstrip(":"), value[0].lower()] for key, value in directives.items()
            if value and (key.rstrip(":"), value[0].lower()) in TAGS]
    if "hide" in directives: tags.append("remove-cell")
    if "code-fold:" in directives: tags.append("hide-input")
    return sorted(set(tags))


def doc_page(rel: Path) -> str:
    "nbdev's page for the notebook at `rel` (relative to nbs/): number prefix dropped, `.html`."
    return (rel.parent/(re.sub(r"^\d+[a-zA-Z0-9]*_", "", rel.stem) + ".html")).as_posix()


def label(page: str, anchor: str) -> str:
    "A target name for `anchor` on nbdev's `page`, unique across the site."
    return re.sub(r"[^a-z0-9]+", "-", f"api {page.removesuffix('.html')} {anchor}".lower()).strip("-")


class Links:
    "Links to nbdev's Quarto site (`doc_host` + `doc_baseurl`) and notebooks named in code made links to this site."
    def __init__(self, pages: dict, anchors: set):
        cfg = get_config()
        self.site = re.escape(cfg.doc_host.rstrip("/") + "/" + cfg.doc_baseurl.strip("/") + "/")
        self.pages, self.anchors, self.undocumented = pages, anchors, set()

    def target(self, page: str, anchor: str) -> str:
        "Where a link to `page#anchor` goes: its entry, else its class's entry (a method documented with its class)."
        for name in (anchor, anchor.rpartition(".")[0]):
            if name and (page, name) in self.anchors: return "#" + label(page, name)
        self.undocumented.add(f"{page}#{anchor}")
        return self.pages[page]

    def __call__(self, text: str, here: Path, source: Path) -> str:
        "`text` with every link into nbdev's site pointing into this one, relative to the page at `here`."
        def swap(m):
            page, anchor = m["page"], m["anchor"]
            if page not in self.pages: raise ValueError(f"{source}: a link to {page}, which no notebook makes")
            found = self.target(page, anchor) if anchor else self.pages[page]
            return found if found.startswith("#") else relative(found, here)
        text = IMAGES.sub("](" + relative("images/", here), text)
        text = NOTEBOOK.sub(lambda m: f"[{m[0]}]({relative(m[1], here)})" if m[1] in self.pages.values() else m[0], text)
        return re.sub(self.site + r"(?P<page>[\w/.-]+\.html)(?:#(?P<anchor>[\w.-]+))?", swap, text)


def relative(page: str, here: Path) -> str:
    "The path of `page` (relative to the book's root) from the folder of the page at `here`."
    depth = len(here.parent.parts)
    return "../" * depth + page


def show_doc_markdown(output: str, level: int, page: str, seen: set) -> str:
    "A `show_doc` output as a section at heading `level` with a target for its symbol; empty if `seen` on the page."
    text = QUARTO_ATTRIBUTES.sub(r"\1", output.strip().removeprefix("---").strip())
    m = HEADING.search(text)
    if not m: return text
    anchor, source_link = m[2].lower(), text[:m.start()].strip()  # nbdev puts the [source] link above the heading
    if anchor in seen: return ""  # nbdev adds a show_doc after an exported cell even where the notebook has one
    seen.add(anchor)
    return f"({label(page, anchor)})=\n{'#' * level} {m[2]}\n\n{source_link}\n{text[m.end():]}"


def split_title_cell(nb):
    "Move what follows the title and summary in `nb`'s title cell to a cell of its own: nbdev's front matter drops it."
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown": continue
        lines = cell.source.splitlines()
        head = [n for n, line in enumerate(lines[:4]) if re.match(r"#\s|>\s", line)]
        if not head or not lines[0].startswith("# "): return
        rest = "\n".join(line for n, line in enumerate(lines) if n not in head).strip()
        if rest:
            cell.source = "\n\n".join(lines[n] for n in head)
            nb.cells.insert(i + 1, mk_cell(rest, cell_type="markdown"))
            for n, c in enumerate(nb.cells): c.idx_ = n
        return


def processed(path: Path):
    "The notebook at `path` after nbdev's processors (all but the autogenerated-file warning)."
    class Procs(FilterDefaults):
        def base_procs(self): return [p for p in super().base_procs() if p is not insert_warning]
    nb = read_nb(path)
    split_title_cell(nb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tests/test_notebooks.py reports nbdev's warnings on the notebooks
        try: Procs()(nb)
        except Exception as error: raise RuntimeError(f"{path}: nbdev's processing failed: {error}") from error
    return nb


def markdown_output(cell) -> str:
    "The text/markdown output of an evaluated `show_doc` cell."
    for out in cell.get("outputs", []):
        text = out.get("data", {}).get("text/markdown")
        if text: return "".join(text)
    return ""


def draft(rel: Path, source: Path) -> tuple:
    "The page of the notebook at `rel` under nbs/, made from `source`, before links; and the anchors it documents."
    nb = processed(source)
    fm, cells, level, seen = getattr(nb, "frontmatter_", {}) or {}, [], 1, set()
    if fm.get("title"):
        cells.append(nbformat.v4.new_markdown_cell(f"# {fm['title']}\n\n{fm.get('description', '')}".strip()))
    for cell in nb.cells:
        if cell.cell_type == "raw" or not cell.get("source", "").strip(): continue
        if cell.cell_type == "markdown":
            cells.append(nbformat.v4.new_markdown_cell(cell.source))
            level = max([len(h[1]) for h in HEADING.finditer(cell.source)] or [level])
            continue
        directives = extract_directives(cell, remove=True)
        if directives.get("output:") == ["asis"]:
            text = markdown_output(cell)
            if not text: raise ValueError(f"{source}: no output from `{cell.source.strip()}`")
            if md := show_doc_markdown(text, min(level + 1, 3), doc_page(rel), seen): cells.append(
                nbformat.v4.new_markdown_cell(md))
            continue
        code = nbformat.v4.new_code_cell(cell.source, outputs=[nbformat.from_dict(o) for o in cell.get("outputs", [])])
        if tags := cell_tags(directives): code.metadata["tags"] = tags
        cells.append(code)
    kernel = {"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}}
    return nbformat.v4.new_notebook(cells=cells, metadata=kernel), {(doc_page(rel), anchor) for anchor in seen}


def notebooks() -> list:
    "(path relative to nbs/, the file the page is made from) for every page, in the order of the contents."
    rels = [Path("index.ipynb")] + [Path("guides")/f"{name}.ipynb" for name in GUIDES]
    rels += [Path(f"{name}.ipynb") for name in TOP_LEVEL]
    rels += [p.relative_to(NBS) for package in PACKAGES for p in sorted((NBS/package).glob("*.ipynb"))]
    missing = sorted(set(p.relative_to(NBS) for p in NBS.rglob("*.ipynb")) - set(rels))
    if missing: raise ValueError(f"docs/convert.py: no place in the contents for {[str(m) for m in missing]}")
    return [(rel, EXECUTED/rel if (EXECUTED/rel).exists() else NBS/rel) for rel in rels]


def toc(rels: list) -> dict:
    "Jupyter Book's table of contents: the index, then the guides, the main job's notebooks and the API by package."
    def files(prefix): return [{"file": r.with_suffix("").as_posix()} for r in rels if r.parts[0] == prefix
                               or prefix == "" and len(r.parts) == 1 and r.name != "index.ipynb"]
    parts = [{"caption": "Guides", "chapters": files("guides")},
             {"caption": "The main job and its reports", "chapters": files("")}]
    parts += [{"caption": f"API: mil_nb.{p}", "chapters": files(p)} for p in PACKAGES]
    return {"format": "jb-book", "root": "index", "parts": parts}


def convert(dest: Path):
    "Write the book's sources into `dest`: pages, `_toc.yml`, `_config.yml`, `static/` and `images/`."
    found = notebooks()
    with ProcessPoolExecutor(os.cpu_count()) as pool: drafts = list(pool.map(draft, *zip(*found)))
    pages = {doc_page(rel): rel.with_suffix(".ipynb").as_posix() for rel, _ in found}
    links = Links(pages, set().union(*(anchors for _, anchors in drafts)))
    for (rel, source), (nb, _) in zip(found, drafts):
        for cell in nb.cells:
            if cell.cell_type == "markdown": cell.source = links(cell.source, rel, source)
        (dest/rel).parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, dest/rel)
    (dest/"_toc.yml").write_text(yaml.safe_dump(toc([rel for rel, _ in found]), sort_keys=False))
    shutil.copy(DOCS/"_config.yml", dest/"_config.yml")
    for folder in ("static", "images"): shutil.copytree(DOCS/folder, dest/folder, dirs_exist_ok=True)
    if links.undocumented:
        print("linked to their page, no entry documents them:", ", ".join(sorted(links.undocumented)))


if __name__ == "__main__":
    import convert as module  # this file as a module of its own: the worker processes find `draft` by its module's name
    module.convert(Path(sys.argv[1]))
