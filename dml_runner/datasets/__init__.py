"""Datasets: each `conf/dataset/<name>.yaml` instantiates a builder here that returns a `DatasetSplits`.

Each image-file dataset's module ends with its `SPEC` (sources, layout, archive, reader, official counts, fixture),
which its loader's messages read; `registry.SPECS` collects them for dml-prepare, the fixture trees and the tests.
"""

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
