"""`python -m dml_runner.report` = `dml-report`."""

import sys

from dml_runner.cli.report import main

sys.exit(main())
