"""Keep an executed notebook for the site: `python docs/keep_executed.py RUN.ipynb --commit C --machine TEXT`.

The site shows the outputs of the main job, the cohort report and the comparisons from executed copies in
`docs/executed/` (the build executes none of them; `nbdev_clean` keeps outputs out of `nbs/`). This copies a
notebook papermill executed to `docs/executed/<its nbs/ path>`, without widget outputs (progress bars, which need a
live kernel) and with its figures made smaller, and stamps it under its title with where it came from: the commit
its code was at, papermill's start time and parameters, and the machine it ran on (`--machine`: the run's machine,
which this one may not be)."""
import argparse
import base64
import io
from pathlib import Path

import nbformat
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
WIDGET = "application/vnd.jupyter.widget-view+json"
MAX_WIDTH, COLOURS = 960, 256  # figures are re-encoded at most this wide, in this many colours: the copy stays small


def smaller_png(data: str) -> str:
    "A base64 PNG at most MAX_WIDTH px wide, in COLOURS colours."
    image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    if image.width > MAX_WIDTH: image = image.resize((MAX_WIDTH, round(image.height * MAX_WIDTH / image.width)))
    out = io.BytesIO()
    image.quantize(colors=COLOURS).save(out, format="png", optimize=True)
    return base64.b64encode(out.getvalue()).decode()


def stamp(nb, commit: str, machine: str, note: str) -> str:
    "The provenance paragraph of executed notebook `nb`."
    pm = nb.metadata["papermill"]
    params = " ".join(f"-p {k} {v}" for k, v in pm["parameters"].items())
    return (f"**Executed copy.** The outputs on this page come from `papermill {pm['input_path']} OUT.ipynb {params}`"
            f" run with the code of commit `{commit}` from {pm['start_time'][:16].replace('T', ' ')} UTC for "
            f"{pm['duration'] / 60:.1f} minutes on {machine}. Figures are re-encoded at most {MAX_WIDTH} px wide in "
            f"{COLOURS} colours. {note}").strip()


def keep(run: Path, commit: str, machine: str, note: str = "") -> Path:
    "Copy executed notebook `run` into docs/executed/, stamped; return where it went."
    nb = nbformat.read(run, as_version=4)
    if "papermill" not in nb.metadata: raise SystemExit(f"{run}: not a notebook papermill executed")
    dest = REPO/"docs"/"executed"/Path(nb.metadata["papermill"]["input_path"]).relative_to("nbs")
    for cell in nb.cells:
        if cell.cell_type != "code": continue
        cell.outputs = [o for o in cell.outputs if WIDGET not in o.get("data", {})]
        for out in cell.outputs:
            if "image/png" in out.get("data", {}): out.data["image/png"] = smaller_png(out.data["image/png"])
    nb.cells.insert(1, nbformat.v4.new_markdown_cell(stamp(nb, commit, machine, note)))
    dest.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dest)
    return dest


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the executed notebook")
    parser.add_argument("--commit", required=True, help="the commit the notebook and package were at when it ran")
    parser.add_argument("--machine", required=True, help="the machine it ran on, in words")
    parser.add_argument("--note", default="", help="anything else a reader should know about the run")
    print(keep(**vars(parser.parse_args())))
