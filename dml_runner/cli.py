"""`dml-run`: the Hydra entry point (train + evaluate). Thin on purpose: the work is in :func:`dml_runner.run.run`."""

from __future__ import annotations

import logging
import sys
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

    from dml_runner.trainer import RunInterrupted

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
