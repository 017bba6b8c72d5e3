"""`dml-run`: the Hydra entry point (train + evaluate). Thin on purpose: the work is in :func:`dml_runner.run.run`.

It is the one ``@hydra.main`` of the package; ``python -m dml_runner`` (what torchrun launches) runs it too.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from dml_runner import DMLRunnerError
from dml_runner.config import conf_dir, register_configs

log = logging.getLogger("dml_runner")
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its import-time messages are noise here
register_configs()


def _hydra_meta() -> dict[str, Any]:
    hc = HydraConfig.get()
    return {"output_dir": hc.runtime.output_dir, "overrides": list(hc.overrides.task),
            "choices": {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")},
            "job_num": hc.job.num if hc.mode == RunMode.MULTIRUN else None}


def interrupt_message(stop: Any) -> str:
    """One line for a run stopped by a signal (see dml_runner.run.run): what is kept and how to continue."""
    where = getattr(stop, "run_dir", "")
    if getattr(stop, "resume_command", None):
        return (f"interrupted by {stop.signame}; epoch {stop.checkpoint_epoch} is checkpointed in {where}; resume "
                f"with: {stop.resume_command}")
    if getattr(stop, "restart_command", None):
        return f"interrupted by {stop.signame} before the first epoch ended; start again with: {stop.restart_command}"
    return f"interrupted by {stop.signame} after the run finished ({where})"


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def app(cfg: DictConfig) -> float | None:
    from dml_runner.run import format_results_table, run, write_failure
    from dml_runner.training.trainer import RunInterrupted

    meta = _hydra_meta()
    out_dir = Path(meta["output_dir"])
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        results = run(cfg, out_dir, meta)
    except RunInterrupted as stop:
        # one line, no traceback; 130 / 143 as a shell reports a process ended by SIGINT / SIGTERM
        print(f"dml-run: {interrupt_message(stop)}", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    except (DMLRunnerError, Exception) as err:  # noqa: BLE001 - recorded, then re-raised or reported
        out_dir = getattr(err, "run_dir", out_dir)
        write_failure(out_dir, cfg, err, meta)
        if multirun:
            # One crashed job must not lose the sweep: it is recorded as failed and the sweep goes on.
            log.error("job %s failed: %s (recorded in %s)", meta["job_num"], err, out_dir / "results.json")
            return None
        if isinstance(err, DMLRunnerError):
            print(f"dml-run: error: {err}", file=sys.stderr)
            raise SystemExit(1) from None
        raise
    if results.get("rank", 0) != 0:
        return None  # a non-zero rank of a torchrun job: rank 0 evaluates and reports
    print(format_results_table(results))
    print(f"outputs: {results['output_dir']}")
    # The value a Hydra sweeper (hparams_search=optuna) optimises: the selection metric on the VALIDATION split,
    # never the test set (None when the run has no validation split).
    best = results.get("best") or {}
    return best.get("value") if best.get("split") == "val" else None


# One line per config group for `dml-run --help` (tests/test_cli.py checks that every group of conf/ has one).
GROUP_HELP = {
    "dataset": "images and their class-disjoint train/test split (dml_runner/datasets)",
    "transform": "image resizing, cropping and augmentation",
    "backbone": "the embedding network (dml_runner/backbones)",
    "sampler": "how training batches are drawn (dml_runner/samplers)",
    "optimizer": "torch optimiser: optimizer.lr, optimizer.weight_decay, ...",
    "scheduler": "learning-rate schedule, stepped once per epoch",
    "method": "the training procedure around the loss (dml_runner/methods)",
    "loss": "the metric-learning loss (dml_runner/losses)",
    "trainer": "training loop; its options are listed below",
    "eval": "evaluation metrics; its options are listed below",
    "logger": "history.csv (always) and trackers: mlflow, wandb, tensorboard; several: logger=[csv,mlflow]",
    "paths": "where data are read (paths.data_dir, env DML_DATA) and runs are written (paths.output_dir)",
    "hparams_search": "hyperparameter search over the validation split (hparams_search=optuna)",
    "experiment": "a paper's table row or a recipe, as +experiment=<name> (docs/REPRODUCING.md)",
}
# Selected automatically from the dataset (and sampler); listed for completeness, never chosen by hand.
AUTOMATIC_GROUPS = ("preset", "preset_sampler", "preset_trainer", "preset_method")


def format_help(overrides: Sequence[str] = ()) -> str:
    """`dml-run --help`: what each group does, its options (default marked *), then the trainer and eval keys.

    A ``hydra.searchpath=[...]`` among ``overrides`` adds the options of those config folders (a plug-in's), marked
    with their folder."""
    from dml_runner.config import SCHEMAS, default_choices, group_options, schema_help, search_path_dirs

    conf = conf_dir()
    defaults = default_choices()
    lines = ["dml-run: train and evaluate a deep-metric-learning model; every setting is a Hydra override.",
             "usage: dml-run [group=option ...] [group.key=value ...]  (e.g. loss=contrastive optimizer.lr=1e-4)",
             "       dml-run -m key=a,b,c ...   (a sweep: one run per value, summary.csv and plots in the sweep dir)",
             "", "config groups (group=option; * the default):"]
    groups = sorted(p.name for p in conf.iterdir() if p.is_dir() and p.name not in AUTOMATIC_GROUPS
                    and p.name != "hydra")
    width = max(len(g) for g in groups)
    for group in groups:
        options = group_options(group)
        if group == "experiment":
            families = sorted({o.split("/")[0] for o in options})
            shown = f"{len(options)} rows under " + ", ".join(f"{f}/" for f in families)
        else:
            shown = ", ".join(o + ("*" if defaults.get(group) == o else "") for o in options)
        for extra in search_path_dirs(overrides):
            added = [o for o in group_options(group, extra) if o not in options]
            if added:
                shown += f"; from {extra}: " + ", ".join(added)
        lines.append(f"  {group:<{width}}  {GROUP_HELP.get(group, '')}: {shown}")
    for group, schema in SCHEMAS.items():
        lines += ["", f"{group} options ({group}.KEY=VALUE; default in brackets):"]
        rows = schema_help(schema)
        key_width = max(len(name) for name, _, _ in rows)
        for name, default, text in rows:
            lines.append(f"  {name:<{key_width}}  {text} [{_show_default(default)}]")
    lines += ["", "the other groups' keys: `dml-run <group>=<option> --cfg job` prints the composed config.",
              "hydra: --cfg job | --info | --hydra-help | hydra/launcher=local_parallel|slurm (sweep jobs)"]
    return "\n".join(lines)


def _show_default(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def main() -> None:
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        print(format_help(sys.argv[1:]))
        return
    from dml_runner.training import callbacks

    app()
    if callbacks.FAILED_JOBS:  # a sweep with failed jobs (listed by the sweep summary) is not a success
        raise SystemExit(1)


if __name__ == "__main__":
    main()
