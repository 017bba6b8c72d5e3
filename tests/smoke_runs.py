"""``scripts/reproduce.py <target> --smoke`` run once per pytest session and shared by the tests that read it.

tests/test_reproduce_smoke.py checks that each target ends with its table; tests/test_real_path.py checks every
row's run directory (weights, frozen and trained parameters, loss, embeddings, Divide and Conquer phases). Both
read the same runs: a target is trained once per session, whichever test asks first (with the ``hub_cache``
fixture active, so ``backbone.pretrained=true`` loads torchvision's files from it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "reproduce.py"
TARGET_DIRS = {"table1": "hdml/table1_cub200/", "table2": "hdml/table2_cars196/", "table3": "hdml/table3_sop/",
               "lifted": "lifted/", "dc": "dc/", "mdl": "mdl/"}


def target_of(experiment: str) -> str:
    """The reproduce target whose table holds ``experiment`` (``hdml/table2_cars196/npair`` -> ``table2``)."""
    for target, prefix in TARGET_DIRS.items():
        if experiment.startswith(prefix):
            return target
    raise KeyError(f"no reproduce target runs {experiment}")


@dataclass
class TargetRun:
    target: str
    returncode: int
    stdout: str
    stderr: str
    sweep: Path
    tables: Path
    seconds: float
    cpu_seconds: float
    jobs: dict[str, Path] = field(default_factory=dict)  # experiment name -> run directory

    def output(self, chars: int = 4000) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout[-chars:]}\n--- stderr\n{self.stderr[-chars:]}"

    def results(self, experiment: str) -> dict[str, Any]:
        if experiment not in self.jobs:
            raise AssertionError(f"{experiment}: no run directory under {self.sweep}\n{self.output()}")
        return json.loads((self.jobs[experiment] / "results.json").read_text())


_RUNS: dict[str, TargetRun] = {}


def run_target(target: str, base: Path, seeds: int = 1) -> TargetRun:
    """``reproduce.py <target> --smoke --seeds <seeds>`` with checkpoints saved, once per session (cached)."""
    if target in _RUNS:
        return _RUNS[target]
    sweep, tables = Path(base) / target / "sweep", Path(base) / target / "tables"
    cmd = [sys.executable, str(SCRIPT), target, "--smoke", "--seeds", str(seeds), "--out", str(sweep),
           "--tables", str(tables), "--", "trainer.save_checkpoints=true"]
    before = os.times()
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=base, capture_output=True, text=True, timeout=1800)
    after = os.times()
    run = TargetRun(target, proc.returncode, proc.stdout, proc.stderr, sweep, tables, time.time() - t0,
                    (after.children_user - before.children_user) + (after.children_system - before.children_system))
    for results in sweep.rglob("results.json"):
        experiment = (json.loads(results.read_text()).get("choices") or {}).get("experiment")
        if experiment:
            run.jobs[experiment] = results.parent
    _RUNS[target] = run
    print(f"\nreproduce {target} --smoke: {run.seconds:.0f} s wall, {run.cpu_seconds:.0f} s CPU, exit {run.returncode}")
    return run
