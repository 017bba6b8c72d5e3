"""Only here to ship the top-level conf/ tree inside wheels as dml_runner/conf (all metadata is in pyproject.toml).

Editable installs read conf/ from the checkout directly (see dml_runner.config.conf_dir).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConf(build_py):
    def run(self) -> None:
        super().run()
        if not getattr(self, "editable_mode", False):
            shutil.copytree(Path(__file__).parent / "conf", Path(self.build_lib) / "dml_runner" / "conf",
                            dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithConf})
