#!/usr/bin/env python
"""The dataset checker and downloader; installed as the ``dml-prepare`` command (see :mod:`dml_runner.prepare`)."""

import sys

from dml_runner.prepare import check, describe, download, listed_images, main  # noqa: F401 - the script's API

if __name__ == "__main__":
    sys.exit(main())
