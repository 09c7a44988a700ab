"""The documentation site: docs/convert.py's mapping of nbdev's directives, README.md generated from nbs/index.ipynb,
and (slow) the site `docs/build` makes: no dead internal link or anchor, and in Debian's headless Chromium the index,
the model page and a guide show their heading and rendered formulas, search finds `AttentionMIL`, and nothing fails
to load or logs an error. A screenshot of the model page goes to /tmp/docs_model.png."""
import functools
import subprocess
import sys
import threading
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from conftest import REPO
from execnb.nbio import dict2nb, mk_cell

sys.path.insert(0, str(REPO/"docs"))
import convert  # noqa: E402  (docs/convert.py)
import readme  # noqa: E402  (docs/readme.py)

from mil_nb.core.net import free_port  # noqa: E402

PAGES = {"index.html": "mil_nb", "models/10_model.html": "Attention-based MIL models",
         "guides/train_on_your_slides.html": "Train on your slides"}
MAX_README_BYTES = 8 * 1024


def test_directives_become_jupyter_book_tags():
    assert convert.cell_tags({"echo:": ["false"]}) == ["remove-input"]
    assert convert.cell_tags({"output:": ["false"]}) == ["remove-output"]
    assert convert.cell_tags({"include:": ["false"]}) == ["remove-cell"]
    assert convert.cell_tags({"hide": []}) == ["remove-cell"]
    assert convert.cell_tags({"code-fold:": ["show"], "code-summary:": ['"Exported source"']}) == ["hide-input"]
    assert convert.cell_tags({"notest": [], "eval:": ["true"], "echo:": ["true"]}) == []


def test_show_doc_output_becomes_a_section_with_a_target():
    output = ('---\n\n[source](https://github.com/x/y.py#L1){target="_blank" style="float:right"}\n\n'
              "### AttentionMIL.forward\n\n```python\ndef forward(\n    mask:Tensor, # the real instances\n)\n```\n")
    seen = set()
    md = convert.show_doc_markdown(output, 2, "models/model.html", seen)
    assert md.startswith("(api-models-model-attentionmil-forward)=\n## AttentionMIL.forward\n\n"
                         "[source](https://github.com/x/y.py#L1)\n")
    assert "{target" not in md and "# the real instances" in md and seen == {"attentionmil.forward"}
    assert convert.show_doc_markdown(output, 2, "models/model.html", seen) == ""  # one entry a symbol on a page


def test_the_title_cell_keeps_what_follows_its_title():
    nb = dict2nb({"cells": [mk_cell("# T\n\n> d\n\nMore text.", "markdown"), mk_cell("x = 1")], "metadata": {}})
    convert.split_title_cell(nb)
    assert [(c.source, c.idx_) for c in nb.cells] == [("# T\n\n> d", 0), ("More text.", 1), ("x = 1", 2)]


def test_links_to_nbdevs_site_point_at_the_pages_and_entries():
    links = convert.Links({"models/model.html": "models/10_model.ipynb", "bags/data.html": "bags/30_data.ipynb"},
                          {("models/model.html", "attentionmil")})
    site = "https://mil-nb.github.io/mil_nb/"
    text = (f"[`AttentionMIL`]({site}models/model.html#attentionmil), [`forward`]({site}models/model.html#"
            f"attentionmil.forward), [`Bag`]({site}bags/data.html#bag), [data]({site}bags/data.html), "
            "`nbs/bags/30_data.ipynb`, `nbs/gone.ipynb`")
    assert links(text, Path("guides/x.ipynb"), Path("nbs/guides/x.ipynb")) == (
        "[`AttentionMIL`](#api-models-model-attentionmil), [`forward`](#api-models-model-attentionmil), "
        "[`Bag`](../bags/30_data.ipynb), [data](../bags/30_data.ipynb), "
        "[`nbs/bags/30_data.ipynb`](../bags/30_data.ipynb), `nbs/gone.ipynb`")
    assert links.undocumented == {"bags/data.html#bag"}
    with pytest.raises(ValueError, match="nbs/x.ipynb: a link to gone.html"): links(f"[a]({site}gone.html)", Path("x"),
                                                                                  Path("nbs/x.ipynb"))


def test_every_notebook_has_a_page():
    pages = {rel for rel, _ in convert.notebooks()}
    assert pages == {p.relative_to(REPO/"nbs") for p in (REPO/"nbs").rglob("*.ipynb")}


def test_readme_is_generated_from_the_index_notebook():
    assert (REPO/"README.md").read_text() == readme.readme_text(), "README.md is stale: run python docs/readme.py"
    size = len((REPO/"README.md").read_bytes())
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes, over {MAX_README_BYTES}"
    long = [line[:60] for line in (REPO/"README.md").read_text().splitlines() if len(line) > 120]
    assert not long, f"README.md: lines over 120 characters: {long}"


class Targets(HTMLParser):
    "The ids a page defines and the site-relative links it makes (href and src)."
    def __init__(self):
        super().__init__()
        self.ids, self.links = set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.ids.update(attrs[key] for key in ("id", "name") if attrs.get(key))
        for key in ("href", "src"):
            url = attrs.get(key)
            if url and not urlsplit(url).scheme and not url.startswith("//"): self.links.append(url)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    "The site docs/build makes (its warnings are errors), in a temporary folder."
    dest = tmp_path_factory.mktemp("site")
    run = subprocess.run([str(REPO/"docs"/"build"), str(dest)], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, f"docs/build failed:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    return dest/"html"


@pytest.mark.slow
def test_no_dead_internal_link_or_anchor(site):
    parsed = {}
    for page in site.rglob("*.html"):  # the pages, and the theme's templates in _static/ (links are not checked there)
        parsed[page] = Targets()
        parsed[page].feed(page.read_text())
    dead = []
    for page, found in parsed.items():
        for url in found.links if "_static" not in page.relative_to(site).parts else []:
            parts = urlsplit(url)
            target = (page.parent/unquote(parts.path)).resolve() if parts.path else page
            if target.is_dir(): target = target/"index.html"
            if not target.exists(): dead.append(f"{page.relative_to(site)}: {url} (no such file)")
            elif parts.fragment and target.suffix == ".html" and unquote(parts.fragment) not in parsed[target].ids:
                dead.append(f"{page.relative_to(site)}: {url} (no such anchor)")
    assert len(parsed) > 50 and not dead, "\n".join(dead[:50])


@pytest.fixture(scope="module")
def served(site):
    "The site served over HTTP on 127.0.0.1: its address."
    handler = functools.partial(type("Quiet", (SimpleHTTPRequestHandler,), {"log_message": lambda *a: None}),
                                directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    from test_jupyterlab import CHROMIUM, CHROMIUM_ARGS
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, origin: str, path: str):
    "The page at `origin/path`, loaded and typeset, and its problems: console errors, failed or outside requests."
    page, problems = browser.new_page(viewport={"width": 1280, "height": 1000}), []
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url} {r.failure}"))
    page.on("response", lambda r: r.status >= 400 and problems.append(f"HTTP {r.status}: {r.url}"))
    page.route(lambda url: not url.startswith(origin + "/"),
               lambda route: (problems.append(f"outside request: {route.request.url}"), route.abort()))
    page.goto(f"{origin}/{path}", wait_until="networkidle")
    page.wait_for_function("() => !window.MathJax || window.MathJax.startup?.promise", timeout=10_000)
    page.evaluate("() => window.MathJax?.startup?.promise")
    return page, problems


@pytest.mark.slow
@pytest.mark.parametrize("path", PAGES)
def test_pages_render_in_a_browser(browser, served, path):
    page, problems = open_page(browser, served, path)
    assert page.locator("main h1").first.inner_text().rstrip("#").strip() == PAGES[path]
    raw = page.evaluate("() => [...document.querySelectorAll('.math')].filter(e => !e.querySelector('mjx-container'))"
                        ".map(e => e.textContent.slice(0, 80))")
    assert not raw, f"formulas left as TeX on {path}: {raw}"
    assert "$$" not in page.locator("main").inner_text()
    if path == "models/10_model.html":
        assert page.locator("mjx-container").count() > 0
        assert page.locator("#api-models-model-attentionmil-forward").count() == 1
        page.screenshot(path="/tmp/docs_model.png", full_page=True)
    assert not problems, problems


@pytest.mark.slow
def test_search_finds_attention_mil(browser, served):
    page, problems = open_page(browser, served, "search.html?q=AttentionMIL")
    page.wait_for_selector("#search-results li a", timeout=15_000)
    hits = page.eval_on_selector_all("#search-results li a", "links => links.map(a => a.getAttribute('href'))")
    assert any(h.startswith("models/10_model.html") for h in hits), hits
    assert not problems, problems
