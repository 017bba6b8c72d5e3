"""dml-runner: a config-driven experiment runner for deep metric learning."""

__version__ = "0.1.0"


class DMLRunnerError(Exception):
    """An error caused by user input (config, data, files) with a message that says what to do.

    The command-line entry points print the message without a traceback and exit non-zero.
    """
