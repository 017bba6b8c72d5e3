#!/usr/bin/env python
"""The dataset checker and downloader; installed as the ``dml-prepare`` command (see :mod:`dml_runner.cli.prepare`)."""

import sys

from dml_runner.cli.prepare import main
from dml_runner.datasets.prepare import check, describe, download, listed_images  # noqa: F401 - the script's API

if __name__ == "__main__":
    sys.exit(main())
