"""`nbs/train.ipynb` explored as a user does, in a real browser: JupyterLab driven by headless Chromium (Playwright).

A copy of the notebook under `runs/` gets small parameters and a relative `output_dir`, is opened in JupyterLab,
run with Run > Run All Cells and saved with Ctrl+S. Then neither the page nor the saved notebook may hold an error,
the figures must show, `nbs/` must be untouched, and the files must land under the repository's `runs/`: relative
paths resolve against the repository root although the kernel runs in the copy's folder. Needs Debian's chromium.
"""
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nbformat
import pytest
from conftest import REPO
from playwright.sync_api import expect, sync_playwright

from mil_nb.core.net import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SMALL = {"epochs": 1, "tile_size": 32, "n_tiles": 8, "num_workers": 0}  # on the 24 small slides: a run of seconds
STDERR = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
KERNEL = '.jp-StatusBar-TextItem[title^="Change kernel"]'  # the status bar's "Python 3 (ipykernel) | Idle"
SETTINGS = {"notebook-extension/tracker": {"windowingMode": "none"},  # every cell in the page, not only visible ones
            "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False}}
# Run All Cells has finished: the kernel is idle and every code cell has a count, or a cell failed (the rest never ran)
FINISHED = f"""() => {{
    const failed = [...document.querySelectorAll('{STDERR}')].some(o => o.textContent.includes('Traceback'));
    const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent.trim());
    const idle = document.querySelector('{KERNEL}')?.textContent.endsWith('| Idle');
    return failed || (idle && prompts.length > 0 && prompts.every(p => /^\\[\\d+\\]:$/.test(p)));
}}"""


def small_copy(folder: Path, data_dir: Path) -> Path:
    """Copy nbs/train.ipynb into `folder` with small parameters, the slides of `data_dir` and `output_dir` FOLDER/out
    relative to the repository."""
    nb = nbformat.read(REPO/"nbs"/"train.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params = {**SMALL, "data_dir": str(data_dir), "output_dir": str((folder/"out").relative_to(REPO))}
    lines = [f"{name} = {params[name]!r}" if (name := line.split(" = ")[0]) in params else line
             for line in cell.source.splitlines()]
    missing = set(params) - {line.split(" = ")[0] for line in lines}
    assert not missing, f"no {sorted(missing)} in the parameters cell of nbs/train.ipynb"
    cell.source = "\n".join(lines)
    nbformat.write(nb, folder/"train.ipynb")
    return folder/"train.ipynb"


def jupyter_env(home: Path, cache: Path) -> dict:
    "This environment with JupyterLab's config, data, runtime and settings in `home`, and MIL_NB_CACHE at `cache`."
    for name, settings in SETTINGS.items():
        path = home/"settings"/"@jupyterlab"/f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    dirs = {"JUPYTER_CONFIG_DIR": "config", "JUPYTER_DATA_DIR": "data", "JUPYTER_RUNTIME_DIR": "runtime",
            "JUPYTERLAB_SETTINGS_DIR": "settings", "JUPYTERLAB_WORKSPACES_DIR": "workspaces", "IPYTHONDIR": "ipython"}
    return {**os.environ, **{key: str(home/name) for key, name in dirs.items()}, "MIL_NB_CACHE": str(cache)}


def wait_until_up(url: str, token: str, process: subprocess.Popen, log: Path, timeout: float = 120):
    "Return once JupyterLab answers at `url`; fail if it exits or `timeout` seconds pass first."
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"JupyterLab exited ({process.returncode}):\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/api/status", headers={"Authorization": f"token {token}"}).status_code == 200: return
        except httpx.TransportError: time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen):
    "Stop JupyterLab (on SIGTERM it shuts its kernels down), then kill whatever is left of its process group."
    process.terminate()
    try: process.wait(30)
    except subprocess.TimeoutExpired: pass
    try: os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError: pass
    process.wait()


@pytest.fixture
def jupyterlab(tmp_path):
    "JupyterLab serving the repository on a free local port with a token: its URL and token."
    port, token, log = free_port(), secrets.token_hex(16), tmp_path/"jupyterlab.log"
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={REPO}"]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=jupyter_env(tmp_path/"jupyter", tmp_path/"cache"))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, token, process, log)
        yield url, token
    finally:
        stop(process)


@pytest.fixture
def run_folder():
    "A fresh folder under the repository's runs/ (git ignores its contents), removed afterwards."
    folder = REPO/"runs"/f"jupyterlab-test-{secrets.token_hex(4)}"
    folder.mkdir(parents=True)
    try: yield folder
    finally: shutil.rmtree(folder, ignore_errors=True)


def nbs_status() -> str:
    "`git status --porcelain nbs/`."
    return subprocess.run(["git", "status", "--porcelain", "nbs/"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.slow
def test_run_all_cells_in_jupyterlab(run_folder, jupyterlab, small_panda):
    "Run All Cells on a small copy of the main job in JupyterLab: no errors, the figures, files under runs/."
    assert Path(CHROMIUM).exists(), f"no {CHROMIUM}: apt-get install chromium (as .ci/run does)"
    nbs_before, start = nbs_status(), time.monotonic()
    url, token = jupyterlab
    notebook = small_copy(run_folder, small_panda).relative_to(REPO).as_posix()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"{url}/lab/tree/{notebook}?token={token}")
        expect(page.locator(KERNEL)).to_have_text(re.compile(r"\| Idle$"), timeout=120_000)  # notebook and kernel up
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        page.wait_for_function(FINISHED, timeout=6 * 60_000, polling=1000)
        page.keyboard.press("Control+s")
        page.wait_for_selector(".lm-TabBar-tab.jp-mod-dirty", state="detached", timeout=30_000)
        tracebacks = [o.inner_text() for o in page.locator(STDERR).all() if "Traceback" in o.inner_text()]
        images = page.locator(".jp-OutputArea-output img").count()
        browser.close()
    print(f"\nJupyterLab: Run All Cells and save took {time.monotonic() - start:.0f} s", file=sys.stderr)
    assert not tracebacks, "\n\n".join(tracebacks)[-5000:]
    assert images >= 4, f"{images} figures in the page"  # confusion matrix, ROC + learning curves, attention maps
    response = httpx.get(f"{url}/api/contents/{notebook}", headers={"Authorization": f"token {token}"})
    saved = nbformat.from_dict(response.raise_for_status().json()["content"])
    code = [cell for cell in saved.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), "the saved notebook has cells that did not run"
    assert not [out for cell in code for out in cell.outputs if out.output_type == "error"]
    assert nbs_status() == nbs_before, "running the copy changed nbs/"
    out = run_folder/"out"
    written = sorted(str(path.relative_to(REPO)) for path in run_folder.rglob("metrics.json"))
    assert (out/"model.pt").exists() and (out/"metrics.json").exists(), f"not under {out}; metrics.json at {written}"
