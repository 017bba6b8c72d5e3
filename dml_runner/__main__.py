"""`python -m dml_runner ...` is `dml-run ...` (also what torchrun launches)."""

from dml_runner.cli.run import main

main()
