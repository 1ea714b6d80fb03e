"""Only the build step that pyproject.toml cannot declare: ship ``ablations/`` and ``configs/``
(top-level folders, the source of truth) inside the wheel as ``msplora/_resources``, so that
``msplora ablation`` and ``msplora search`` find them in an installed package too
(``msplora.resources`` picks the checkout's folders when running from one)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
FOLDERS = ("ablations", "configs")


class BuildWithResources(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install runs from the checkout, which has the folders
        target = Path(self.build_lib) / "msplora" / "_resources"
        for name in FOLDERS:
            dest = target / name
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(HERE / name, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildWithResources})
