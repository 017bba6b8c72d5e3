"""The image-file datasets, each by the :class:`~dml_runner.datasets.spec.DatasetSpec` its module declares.

``dml-prepare``, the fixture trees, the smoke mode and the tests read the datasets from here; the order is the one
``dml-prepare --sources`` prints. The embedded ``digits`` dataset is no image-file dataset: nothing to download,
check or fake, so it has no spec.
"""

from __future__ import annotations

from dml_runner.datasets import cars196, csv_table, cub200, folder, inshop, sop, vehicleid
from dml_runner.datasets.spec import DatasetSpec

SPECS: dict[str, DatasetSpec] = {
    spec.name: spec for spec in (cub200.SPEC, cars196.SPEC, sop.SPEC, inshop.SPEC, vehicleid.SPEC, folder.SPEC,
                                 csv_table.SPEC)
}
NAMES: tuple[str, ...] = tuple(SPECS)
