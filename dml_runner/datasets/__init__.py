"""Datasets: each `conf/dataset/<name>.yaml` instantiates a builder here that returns a `DatasetSplits`."""

from dml_runner.datasets.base import (
    DatasetSplits,
    LabelledDataset,
    SubsetLabelledDataset,
    TensorLabelledDataset,
    class_disjoint_holdout,
    with_validation_split,
)

__all__ = [
    "DatasetSplits", "LabelledDataset", "SubsetLabelledDataset", "TensorLabelledDataset",
    "class_disjoint_holdout", "with_validation_split",
]
