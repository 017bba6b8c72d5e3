"""The fixture trees for tests: the generator is part of the package's smoke mode (dml_runner.datasets.fixtures).

This name is kept so that test modules can ``from datasets_fixtures import ...``; new code imports the package module.
"""

from dml_runner.datasets.fixtures import *  # noqa: F401,F403
