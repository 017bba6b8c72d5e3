"""Training methods: each `conf/method/<name>.yaml` instantiates a `Method`."""

from dml_runner.methods.base import Method, TrainContext, param_groups
from dml_runner.methods.standard import StandardMethod

__all__ = ["Method", "TrainContext", "StandardMethod", "param_groups"]
from dml_runner.methods.divide_conquer import DivideConquerMethod  # noqa: E402,F401
from dml_runner.methods.hdml import HDMLMethod  # noqa: E402,F401
