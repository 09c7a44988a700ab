"""One command line: `mil_nb <command>` is each console script, and every old script name still answers."""
import configparser
import re
import subprocess

import pytest

from conftest import REPO
from mil_nb.cli.main import main


def console_scripts() -> dict[str, str]:
    "settings.ini's console scripts: name -> module:function."
    config = configparser.ConfigParser(delimiters=["="])
    config.read(REPO/"settings.ini")
    return dict(entry.split("=", 1) for entry in config["DEFAULT"]["console_scripts"].split())


def test_every_old_script_name_answers_help():
    "Users' scripts call mil_nb_tile, mil_nb_launch, ...: each still prints its help (run side by side)."
    names = [name for name in console_scripts() if name != "mil_nb"]
    assert len(names) >= 8
    runs = {name: subprocess.Popen([name, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in names}
    for name, run in runs.items():
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0 and "usage:" in out, (name, err[-2000:])


@pytest.mark.parametrize("command", ["synth", "tile", "features", "predict", "serve", "cv", "launch", "bench"])
def test_mil_nb_command_is_the_script(command, capsys):
    with pytest.raises(SystemExit) as stop: main([command, "--help"])
    assert stop.value.code == 0 and re.search(f"usage: mil_nb[ _]{command}", capsys.readouterr().out)


def test_mil_nb_lists_its_commands_and_refuses_an_unknown_one(capsys):
    with pytest.raises(SystemExit) as stop: main(["--help"])
    assert stop.value.code == 0 and "tile       = mil_nb_tile" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop: main(["tiles"])
    assert stop.value.code == 2 and "unknown command 'tiles'" in capsys.readouterr().err
    run = subprocess.run(["mil_nb", "launch", "train", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and re.search("usage: mil_nb[ _]launch", run.stdout), run.stderr[-2000:]
