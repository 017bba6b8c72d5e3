#!/usr/bin/env python
"""Musgrave et al.'s reality check in one command: the same search budget per loss, class-disjoint folds,
MAP@R, and intervals.

    python scripts/reality_check.py --losses contrastive,triplet,margin --folds 4 --trials 20 -- dataset=cub200
    python scripts/reality_check.py --smoke          # digits, 2 losses x 2 folds x 2 trials: minutes on a CPU

For every loss of ``--losses`` (names of conf/loss/ options):

1. Search: ``--trials`` Optuna trials (TPE, seeded) over the loss's own hyperparameters (``SPACES``; the optimiser,
   batch and schedule stay as configured, as in the paper). A trial trains one model per fold,
   ``dataset.folds=K dataset.fold=0..K-1``: fold i's training classes are held out as its validation split
   (dml_runner/datasets/folds.py). The trial's value is the mean over the folds of the best validation MAP@R of each
   model (``trainer.select_on=val trainer.select_metric=map@r``). The test set plays no part in the search.
2. Final: the K fold models are trained again at the best parameters, for each seed of ``--seeds``.
3. Test: each model's test embeddings give per-query values (dml_runner/evaluation/per_query.py). Two readings,
   as in the paper: "concatenated" evaluates, per seed, the K models' L2-normalised test embeddings concatenated into
   one; "separate" is the mean of the K models evaluated on their own. Each gets a 95% bootstrap interval over the test
   queries and the runs (dml_runner/evaluation/bootstrap.py).

One table (Markdown and JSON) goes to ``--table``; the runs stay under ``--out``. docs/COMPARING.md explains the
protocol and how to read the numbers. Extra Hydra overrides for every job go after ``--``.
Exit status: 0 = table written; 1 = a job failed; 2 = usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The loss's own hyperparameters and their search ranges: (low, high, log scale).
SPACES: dict[str, dict[str, tuple[float, float, bool]]] = {
    "contrastive": {"loss.margin": (0.1, 2.0, False)},
    "triplet": {"loss.margin": (0.01, 1.0, True)},
    "margin": {"loss.alpha": (0.01, 1.0, True), "loss.beta": (0.0, 2.0, False)},
    "lifted": {"loss.margin": (0.1, 2.0, False)},
    "npair": {"loss.l2_reg": (1e-4, 1e-1, True)},
    "angular": {"loss.alpha": (30.0, 55.0, False)},
    "ddml": {"loss.tau": (0.5, 4.0, False), "loss.beta": (1.0, 20.0, True)},
    "mdl": {"loss.margin": (0.01, 1.0, True), "loss.gamma": (1.0, 30.0, True)},
}
SELECTION = ["trainer.select_on=val", "trainer.select_metric=map@r"]
# --smoke: the embedded digits with class-disjoint splits (digits 0-4 train, 5-9 test), one short epoch per model,
# batches of 2 classes x 4 images (a fold of 2-3 training classes holds no more).
SMOKE = {"losses": "contrastive,triplet", "folds": 2, "trials": 2}
SMOKE_OVERRIDES = ["dataset=digits", "dataset.protocol=classes", "trainer=smoke", "trainer.batch_size=8",
                   "sampler=class_balanced", "sampler.samples_per_class=4", "tags=[smoke]"]
METRICS = ("map@r", "recall@1")


class CheckError(Exception):
    """A job failed or an option cannot work: the message says which."""


def dml_run_cmd() -> list[str]:
    script = Path(sys.executable).with_name("dml-run")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dml_runner"]


def fold_jobs(loss: str, folds: int, seeds: list[int], params: dict[str, float], sweep: Path,
              extra: list[str]) -> list[Path]:
    """Train the K fold models (x seeds) of ``loss`` at ``params`` in one multirun; their run directories."""
    cmd = [*dml_run_cmd(), "-m", f"loss={loss}", f"dataset.folds={folds}",
           "dataset.fold=" + ",".join(str(i) for i in range(folds)), "trainer.seed=" + ",".join(map(str, seeds)),
           *SELECTION, *(f"{k}={v!r}" for k, v in params.items()), f"hydra.sweep.dir={sweep}", *extra]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=os.environ.copy())
    runs = sorted(p.parent for p in sweep.glob("*/results.json"))
    failed = [r for r in runs if json.loads((r / "results.json").read_text()).get("status") != "completed"]
    if proc.returncode != 0 or failed or len(runs) != folds * len(seeds):
        raise CheckError(f"loss={loss}: {len(failed) or 'some'} of {folds * len(seeds)} fold jobs failed "
                         f"(see {sweep}); fix the configuration and run again")
    return runs


def validation_score(runs: list[Path]) -> float:
    """Mean over the fold models of each model's best validation MAP@R."""
    values = []
    for run in runs:
        best = json.loads((run / "results.json").read_text()).get("best") or {}
        if best.get("split") != "val" or best.get("value") is None:
            raise CheckError(f"{run}: no validation MAP@R was recorded (dataset.folds must hold out a fold)")
        values.append(float(best["value"]))
    return float(np.mean(values))


def search(loss: str, folds: int, trials: int, seed: int, root: Path, extra: list[str]) -> dict[str, Any]:
    """``trials`` Optuna trials of the loss's space; the best parameters and every trial's value."""
    import optuna

    space = SPACES[loss]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    values = []

    def objective(trial: Any) -> float:
        params = {k: trial.suggest_float(k, lo, hi, log=log) for k, (lo, hi, log) in space.items()}
        runs = fold_jobs(loss, folds, [seed], params, root / loss / f"trial{trial.number}", extra)
        value = validation_score(runs)
        values.append({"trial": trial.number, "params": params, "val_map@r": value})
        print(f"{loss} trial {trial.number}: {params} -> mean validation MAP@R {value:.4f}", flush=True)
        return value

    study.optimize(objective, n_trials=trials, catch=())
    return {"best_params": dict(study.best_params), "best_val_map@r": float(study.best_value), "trials": values}


def test_readings(runs: list[Path], folds: int) -> dict[str, dict[str, Any]]:
    """The concatenated and separate readings of the final fold models, with 95% bootstrap intervals."""
    from dml_runner.evaluation.bootstrap import mean_interval
    from dml_runner.evaluation.per_query import per_query_values

    by_seed: dict[int, list[dict[str, np.ndarray]]] = {}
    for run in runs:
        res = json.loads((run / "results.json").read_text())
        data = dict(np.load(run / "embeddings.npz"))
        by_seed.setdefault(int(res["config"]["trainer"]["seed"]), []).append(data)
    separate: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    concatenated: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    for models in by_seed.values():
        if len(models) != folds:
            raise CheckError(f"expected {folds} fold models per seed, found {len(models)}")
        labels = models[0]["labels"]
        masks = {k: models[0][k] for k in ("query_mask", "gallery_mask") if k in models[0]}
        for data in models:
            if not np.array_equal(data["labels"], labels):
                raise CheckError("the fold models were evaluated on different test sets")
            pq = per_query_values(data["embeddings"], labels, recall_at=(1,), **masks)
            for m in METRICS:
                separate[m].append(pq.values[m])
        unit = [d["embeddings"] / np.maximum(np.linalg.norm(d["embeddings"], axis=1, keepdims=True), 1e-12)
                for d in models]
        pq = per_query_values(np.concatenate(unit, axis=1).astype(np.float32), labels, recall_at=(1,), **masks)
        for m in METRICS:
            concatenated[m].append(pq.values[m])
    out: dict[str, dict[str, Any]] = {}
    for reading, values in (("concatenated", concatenated), ("separate", separate)):
        out[reading] = {}
        for m in METRICS:
            value, low, high = mean_interval(np.stack(values[m]))
            out[reading][m] = {"value": value, "ci_low": low, "ci_high": high, "runs": len(values[m])}
    return out


def markdown(results: dict[str, Any], folds: int, trials: int, seeds: list[int], smoke: bool) -> str:
    head = (f"# Reality check{' (SMOKE: digits, numbers meaningless)' if smoke else ''}\n\n"
            f"{trials} Optuna trials per loss over its own hyperparameters, each scored by the mean best validation "
            f"MAP@R of {folds} class-disjoint folds of the training classes; the {folds} fold models retrained at "
            f"the best parameters (seeds {', '.join(map(str, seeds))}) and evaluated on the test set. "
            "Concatenated: the fold models' L2-normalised test embeddings concatenated, per seed. Separate: the mean "
            "of the fold models evaluated on their own. Values in %, with the 95% bootstrap interval over the test "
            "queries and the runs.\n\n")
    cols = [f"{r} {m.upper() if m == 'map@r' else 'R@1'}" for r in ("concatenated", "separate") for m in METRICS]
    lines = ["| loss | best parameters | val MAP@R | " + " | ".join(cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for loss, r in results.items():
        params = ", ".join(f"{k.split('.', 1)[1]}={v:.4g}" for k, v in r["best_params"].items())
        cells = [f"{100 * c['value']:.2f} [{100 * c['ci_low']:.2f}, {100 * c['ci_high']:.2f}]"
                 for reading in ("concatenated", "separate") for c in (r["test"][reading][m] for m in METRICS)]
        lines.append(f"| {loss} | {params} | {100 * r['best_val_map@r']:.2f} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra, argv = argv[argv.index("--") + 1:], argv[:argv.index("--")]
    p = argparse.ArgumentParser(prog="reality_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--losses", help=f"comma-separated conf/loss options (default: contrastive,triplet,margin; "
                                    f"searchable: {', '.join(SPACES)})")
    p.add_argument("--folds", type=int, help="class-disjoint folds of the training classes (default 4)")
    p.add_argument("--trials", type=int, help="Optuna trials per loss (default 20)")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 of the final fold models (default 1)")
    p.add_argument("--search-seed", type=int, default=0, help="seed of the search (sampler and trial models)")
    p.add_argument("--smoke", action="store_true", help="digits, 2 losses x 2 folds x 2 trials, short runs (CPU)")
    p.add_argument("--out", help="runs (default outputs/reality_check[-smoke]/<time>)")
    p.add_argument("--table", help="table folder (default outputs/tables/reality_check[-smoke])")
    args = p.parse_args(argv)
    losses = (args.losses or (SMOKE["losses"] if args.smoke else "contrastive,triplet,margin")).split(",")
    folds = args.folds or (SMOKE["folds"] if args.smoke else 4)
    trials = args.trials or (SMOKE["trials"] if args.smoke else 20)
    unknown = [x for x in losses if x not in SPACES]
    if unknown:
        p.error(f"--losses {','.join(unknown)}: no search space; searchable losses: {', '.join(SPACES)}")
    if folds < 2 or trials < 1 or args.seeds < 1:
        p.error("--folds must be >= 2, --trials and --seeds >= 1")
    name = "reality_check" + ("-smoke" if args.smoke else "")
    root = Path(args.out or REPO / "outputs" / name / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    table_dir = Path(args.table or REPO / "outputs" / "tables" / name).resolve()
    extra = [*(SMOKE_OVERRIDES if args.smoke else []), *extra]
    seeds = list(range(args.seeds))
    results: dict[str, Any] = {}
    try:
        for loss in losses:
            found = search(loss, folds, trials, args.search_seed, root / "search", extra)
            final = fold_jobs(loss, folds, seeds, found["best_params"], root / "final" / loss, extra)
            results[loss] = {**found, "test": test_readings(final, folds)}
    except CheckError as err:
        print(f"reality_check.py: error: {err}", file=sys.stderr)
        return 1
    table_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(results, folds, trials, seeds, args.smoke)
    (table_dir / "reality_check.md").write_text(text)
    (table_dir / "reality_check.json").write_text(json.dumps(
        {"folds": folds, "trials": trials, "seeds": seeds, "overrides": extra, "runs": str(root),
         "losses": results}, indent=2) + "\n")
    print(text)
    print(f"table: {table_dir / 'reality_check.md'}; runs: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
