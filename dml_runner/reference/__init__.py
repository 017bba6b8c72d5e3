"""Published numbers of the reproduced papers, as data: one CSV per paper table (``<table>.csv``, in percent).

Every line is ONE number with its ``source``, a ``verified`` flag (true only where the number was matched against
a second copy) and ``checked_against``, which names that copy;
``trainable = false`` marks paper-only rows (e.g. DAML, not implemented here). These are the papers' numbers, never
dml-runner's. Lines starting with ``#`` describe the table. Example::

    >>> from dml_runner.reference import load_reference
    >>> ref = load_reference("hdml_table1_cub200")
    >>> float(ref.query("row == 'npair' and metric == 'recall@1'")["value"].iloc[0])
    51.9
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

REFERENCE_DIR = Path(__file__).resolve().parent


def reference_tables() -> list[str]:
    """Names of the stored tables (the ``reference.table`` key of an experiment file)."""
    return sorted(p.stem for p in REFERENCE_DIR.glob("*.csv"))


def load_reference(table: str) -> pd.DataFrame:
    """The numbers of one table; an empty frame (same columns) for a table without published numbers (MDL)."""
    path = REFERENCE_DIR / f"{table}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no reference table {table!r}; known: {', '.join(reference_tables())}")
    frame = pd.read_csv(path, comment="#", dtype={"row": str, "metric": str, "source": str, "note": str})
    frame["verified"] = frame["verified"].astype(str).str.lower() == "true"
    frame["trainable"] = frame["trainable"].astype(str).str.lower() == "true"
    frame["note"] = frame["note"].fillna("")
    return frame


def table_description(table: str) -> str:
    """The ``#`` header of a table file, as one paragraph."""
    lines = (REFERENCE_DIR / f"{table}.csv").read_text().splitlines()
    return " ".join(line[1:].strip() for line in lines if line.startswith("#"))


def row_deviations(reference: Any) -> list[str]:
    """Every deviation a paper row declares, as one list: those its table's rows share (``table_deviations``, set
    in the table's base config) followed by its own (``deviations``). ``reference``: the row's ``reference`` node."""
    if not reference:
        return []
    shared, own = reference.get("table_deviations"), reference.get("deviations")
    return [str(d) for d in [*(shared or []), *(own or [])]]
