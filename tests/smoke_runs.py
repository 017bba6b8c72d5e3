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


READERS = ("test_real_path.py", "test_reproduce_smoke.py")  # the test files that read the smoke runs


def needed_targets(items: list[Any]) -> list[str]:
    """The targets the selected tests (pytest items) read: rows of test_real_path, targets of test_reproduce_smoke."""
    out: list[str] = []
    for item in items:
        if Path(str(item.fspath)).name not in READERS:  # other files have "row" parameters of their own
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        target = params.get("target") or (target_of(params["row"]) if "row" in params else None)
        if target and target not in out:
            out.append(target)
    return out


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
    cpu_seconds: float  # of the reproduce process and its dml-run children
    jobs: dict[str, Path] = field(default_factory=dict)  # experiment name -> run directory

    def output(self, chars: int = 4000) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout[-chars:]}\n--- stderr\n{self.stderr[-chars:]}"

    def results(self, experiment: str) -> dict[str, Any]:
        if experiment not in self.jobs:
            raise AssertionError(f"{experiment}: no run directory under {self.sweep}\n{self.output()}")
        return json.loads((self.jobs[experiment] / "results.json").read_text())


PARALLEL = 2  # reproduce runs at once (each trains on one thread; the suite's budget is counted on 2 cores)
_RUNS: dict[str, TargetRun] = {}
_RUNNING: dict[str, tuple[subprocess.Popen, float, Any, Path, Path]] = {}
_QUEUE: list[str] = []


def prefetch(targets: list[str], base: Path) -> None:
    """Queue ``targets`` to run PARALLEL at a time in the background (the tests that need them wait in run_target)."""
    _QUEUE.extend(t for t in targets if t not in _RUNS and t not in _RUNNING and t not in _QUEUE)
    _fill(Path(base))


def _start(target: str, base: Path) -> None:
    sweep, tables = base / target / "sweep", base / target / "tables"
    cmd = [sys.executable, str(SCRIPT), target, "--smoke", "--seeds", "1", "--out", str(sweep), "--tables",
           str(tables), "--", "trainer.save_checkpoints=true"]
    log = open(base / f"{target}.log", "w+")  # noqa: SIM115 - read back when the run ends
    err = open(base / f"{target}.err", "w+")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=base, stdout=log, stderr=err, text=True)
    _RUNNING[target] = (proc, time.time(), (log, err), sweep, tables)


def _fill(base: Path) -> None:
    while _QUEUE and len(_RUNNING) < PARALLEL:
        _start(_QUEUE.pop(0), base)


def _finish(target: str) -> None:
    proc, started, (log, err), sweep, tables = _RUNNING.pop(target)
    log.seek(0)
    err.seek(0)
    usage = _child_cpu(proc.pid)
    run = TargetRun(target, proc.returncode, log.read(), err.read(), sweep, tables, time.time() - started, usage)
    log.close()
    err.close()
    for results in sweep.rglob("results.json"):
        experiment = (json.loads(results.read_text()).get("choices") or {}).get("experiment")
        if experiment:
            run.jobs[experiment] = results.parent
    _RUNS[target] = run
    print(f"\nreproduce {target} --smoke: {run.seconds:.0f} s wall, {run.cpu_seconds:.0f} s CPU, exit {run.returncode}")


_CPU: dict[int, float] = {}


def _child_cpu(pid: int) -> float:
    return _CPU.pop(pid, float("nan"))


def run_target(target: str, base: Path) -> TargetRun:
    """``reproduce.py <target> --smoke --seeds 1`` with checkpoints saved, once per session (cached); starts it
    unless prefetch() did."""
    base = Path(base)
    if target in _RUNS:
        return _RUNS[target]
    if target not in _RUNNING:
        if target in _QUEUE:
            _QUEUE.remove(target)
        _QUEUE.insert(0, target)
        if len(_RUNNING) >= PARALLEL:  # the wanted run goes next; wait for a slot
            _wait_any(base)
        _fill(base)
    while target not in _RUNS:
        _wait_any(base)
    return _RUNS[target]


def _wait_any(base: Path) -> None:
    """Block until one running reproduce process ends; record it and start the next queued one."""
    pid, status, usage = os.wait4(-1, 0)
    for name, (proc, *_rest) in list(_RUNNING.items()):
        if proc.pid == pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            _CPU[pid] = usage.ru_utime + usage.ru_stime
            _finish(name)
            break
    _fill(base)
