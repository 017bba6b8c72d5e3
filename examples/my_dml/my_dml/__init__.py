"""An example plug-in for dml-runner: a loss, a dataset, a backbone, a method and a sampler that live outside the
repository.

Put this folder's parent on the Python path and its ``conf/`` on Hydra's search path (docs/EXTENDING.md).
"""
