"Package metadata for mil_nb. Every setting lives in settings.ini (nbdev 2's layout): edit there, not here."
import shlex
from configparser import ConfigParser

import setuptools
from setuptools.command.build_py import build_py

config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

required = "lib_name version description keywords author author_email user branch license status min_python git_url".split()
missing = [key for key in required if key not in cfg]
assert not missing, f"settings.ini is missing {missing}"

spdx_licenses = {"apache2": "Apache-2.0"}  # an SPDX expression: setuptools warns of License classifiers
license_expression = spdx_licenses.get(cfg["license"].lower(), cfg["license"])
statuses = ["1 - Planning", "2 - Pre-Alpha", "3 - Alpha", "4 - Beta", "5 - Production/Stable", "6 - Mature", "7 - Inactive"]


class BuildWithMainJob(build_py):
    "Ship the main job's notebook (nbs/train.ipynb) in the package, as mil_nb/train/train.ipynb (TRAIN_NOTEBOOK)."
    def run(self):
        super().run()
        if not self.editable_mode:  # an editable install finds it in nbs/
            self.copy_file("nbs/train.ipynb", f"{self.build_lib}/{cfg['lib_path']}/train/train.ipynb")


setuptools.setup(
    cmdclass={"build_py": BuildWithMainJob},
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    keywords=cfg["keywords"],
    author=cfg["author"],
    author_email=cfg["author_email"],
    license=license_expression,
    url=cfg["git_url"],
    classifiers=[f"Development Status :: {statuses[int(cfg['status']) - 1]}",
                 f"Intended Audience :: {cfg['audience']}",
                 f"Natural Language :: {cfg['language']}",
                 "Programming Language :: Python :: 3"],
    packages=setuptools.find_packages(include=[cfg["lib_path"], cfg["lib_path"] + ".*"]),
    include_package_data=True,
    install_requires=shlex.split(cfg.get("requirements", "")),
    extras_require={"dev": shlex.split(cfg.get("dev_requirements", ""))},
    python_requires=">=" + cfg["min_python"],
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    zip_safe=False,
    entry_points={
        "console_scripts": cfg.get("console_scripts", "").split(),
        "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
        # papermill makes the output notebook's folder (see nbs/core/60_papermill_io.ipynb)
        "papermill.io": [f"{prefix}={cfg['lib_path']}.core.papermill_io:folder_making_handler" for prefix in ("/", "runs/")],
    },
)
