"""`dml-run`: the Hydra entry point (train + evaluate). Thin on purpose: the work is in :func:`dml_runner.run.run`.

It is the one ``@hydra.main`` of the package; ``python -m dml_runner`` (what torchrun launches) runs it too.
"""

from __future__ import annotations

import logging
import os
import re
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

    from dml_runner.config import validate_config

    meta = _hydra_meta()
    out_dir = Path(meta["output_dir"])
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if not multirun:  # a sweep records a refused job as failed, in its summary
        try:
            validate_config(cfg)
        except DMLRunnerError as err:  # refused before any work: no run folder is left behind
            _remove_unused_run_dir(out_dir, Path(str(cfg.paths.output_dir)))
            print(f"dml-run: error: {err}", file=sys.stderr)
            raise SystemExit(1) from None
    applied = preset_settings(meta["choices"], meta["overrides"])
    if applied:
        log.info("presets applied (the command line wins over them): %s",
                 "; ".join(f"{where}: {' '.join(f'{k}={v}' for k, v in keys.items())}" for where, keys in applied))
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


def _remove_unused_run_dir(out_dir: Path, output_root: Path) -> None:
    """Remove the folder Hydra made for a run that did nothing (only .hydra/ and cli.log in it) and, for a folder of
    the default layout under ``paths.output_dir``, the date folders above it that are left empty; anything else in
    it keeps the folder, and nothing at or above ``paths.output_dir`` is touched."""
    import shutil

    out_dir, output_root = out_dir.absolute(), output_root.absolute()
    names = {p.name for p in out_dir.iterdir()} if out_dir.is_dir() else set()
    if ".hydra" not in names or not names <= {".hydra", "cli.log"}:
        return
    shutil.rmtree(out_dir, ignore_errors=True)
    if output_root not in out_dir.parents:
        return
    for parent in out_dir.parents:
        if parent == output_root or any(parent.iterdir()):
            break
        parent.rmdir()


def preset_settings(choices: dict[str, Any], overrides: Sequence[str] = ()) -> list[tuple[str, dict[str, Any]]]:
    """The settings each automatically chosen preset (``preset``, ``preset_sampler``, ...) made for this run:
    ``[("preset/digits", {"trainer.batch_size": 20, ...}), ...]``, less the keys the command line set."""
    from omegaconf import OmegaConf

    from dml_runner.rundir import flatten_config, split_override

    given = {split_override(o)[0].lstrip("+~") for o in overrides}
    out = []
    for group in AUTOMATIC_GROUPS:
        option = choices.get(group)
        path = conf_dir() / group / f"{option}.yaml"
        if option and path.is_file():
            tree = OmegaConf.to_container(OmegaConf.load(path))
            keys = {k: v for k, v in flatten_config({k: v for k, v in tree.items() if k != "defaults"}).items()
                    if k not in given}
            if keys:
                out.append((f"{group}/{option}", keys))
    return out


def _preset_help() -> list[str]:
    """`--help`'s lines on the presets: which dataset (and sampler, trainer, method) selects each, and its settings,
    so the defaults in brackets are read with them."""
    lines = ["", "presets (applied automatically for these choices, over the defaults in brackets; the command line "
                 "wins):"]
    for group in AUTOMATIC_GROUPS:
        for option in group_options_of(group):
            when = f"dataset={option}" if group == "preset" else \
                f"dataset={option.split('_', 1)[0]} {group.split('_', 1)[1]}={option.split('_', 1)[1]}"
            settings = preset_settings({group: option})
            if settings:
                shown = " ".join(f"{k}={v}" for k, v in settings[0][1].items())
                lines.append(f"  {when}: {shown}  ({group}/{option})")
    return lines


def group_options_of(group: str) -> list[str]:
    from dml_runner.config import group_options

    return group_options(group) if (conf_dir() / group).is_dir() else []


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
    lines += _preset_help()
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


# Hydra's own flags that change what is composed or print instead of running: the command line is then left to Hydra.
_HYDRA_FLAGS = ("--cfg", "-c", "--info", "-i", "--hydra-help", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc", "--package", "-p",
                "--version", "--resolve")
_NO_TRACKER = ("null", "none", "~")


def prepare_arguments(args: Sequence[str]) -> list[str]:
    """The command line with what is clear but that Hydra refuses written its way: ``logger=null`` (no tracker) is
    ``logger=[]``, and a value starting with ``~/`` (a home-relative path) is expanded."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if arg.startswith("-") or not eq:
            out.append(arg)
        elif key.lstrip("+") == "logger" and value.strip().lower() in _NO_TRACKER:
            out.append("logger=[]")
        elif value == "~" or value.startswith("~/"):
            path = os.path.expanduser(value)
            out.append(f"{key}={path}" if re.fullmatch(r"[\w/.\-]+", path) else f"{key}='{path}'")
        else:
            out.append(arg)
    return out


def check_command_line(args: Sequence[str]) -> Any:
    """Refuse, in one line with a "did you mean", a command line Hydra cannot compose (a misspelt key, group or
    option, a value of the wrong type, an unreadable override) and a run or sweep directory that cannot be written;
    Hydra's own messages span several lines. Returns the composed config (with ``hydra``); does nothing and returns
    None when a Hydra flag such as ``--cfg`` is given."""
    if any(arg.split("=")[0] in _HYDRA_FLAGS for arg in args):
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    multirun = any(arg in ("-m", "--multirun") for arg in args)
    items = [arg for arg in args if not arg.startswith("-")]
    parser = OverridesParser.create()
    parsed = []
    for item in items:
        try:
            parsed.append((item, parser.parse_overrides([item])[0]))
        except Exception as err:  # noqa: BLE001 - Hydra's OverrideParseException, with a lexer's multi-line text
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DMLRunnerError(f"{item}: not a valid override ({reason}); write key=value, and quote a value "
                                 "with special characters: key='...'") from None
    groups = _group_names()
    extra_conf = _extra_conf_dirs(items)
    for item, ov in parsed:
        if ov.key_or_group in groups and not ov.is_delete():
            _check_group_option(item, ov.key_or_group, _values(ov), extra_conf)
    plain = [item if not ov.is_sweep_override() else f"{item.split('=', 1)[0]}={_values(ov)[0]}"
             for item, ov in parsed if not ov.is_sweep_override() or _values(ov)]
    try:
        cfg = _compose(plain, with_hydra=True)
    except Exception as err:  # noqa: BLE001 - Hydra's composition errors; explained override by override
        raise DMLRunnerError(_explain(parsed, groups, err)) from None
    _check_output_dir(cfg, multirun, items)
    return cfg


def continue_sweep(cfg: Any, args: Sequence[str]) -> list[str]:
    """``hydra.sweep.dir=<earlier sweep>`` for ``dml-run -m ... trainer.resume=auto`` when an unfinished sweep with
    the same overrides exists under ``paths.output_dir`` (and no sweep directory was named): the resumed jobs and
    the ones not yet run then finish in that one directory, with one summary.csv."""
    from dml_runner.training.checkpoint import find_unfinished_sweep

    items = [arg for arg in args if not arg.startswith("-")]
    if str(cfg.trainer.get("resume")) != "auto" or any(i.lstrip("+").startswith("hydra.sweep.dir=") for i in items):
        return []
    earlier = find_unfinished_sweep(Path(str(cfg.paths.output_dir)), items)
    if earlier is None:
        return []
    print(f"dml-run: trainer.resume=auto: continuing the unfinished sweep in {earlier}")
    return [f"hydra.sweep.dir={earlier}"]


def _group_names() -> set[str]:
    conf = conf_dir()
    return {p.name for p in conf.iterdir() if p.is_dir() and p.name != "hydra"}


def _extra_conf_dirs(items: Sequence[str]) -> list[Path]:
    from dml_runner.config import search_path_dirs

    return search_path_dirs(items)


def _values(ov: Any) -> list[str]:
    """The option or value strings of an override: each value of a sweep, each element of a list; none for a sweep
    that only its sweeper can draw from (``interval(...)``, ``glob(...)``)."""
    if ov.is_sweep_override():
        try:
            return list(ov.sweep_string_iterator())
        except Exception:  # noqa: BLE001 - Hydra's "can only enumerate CHOICE and RANGE sweeps" and the like
            return []
    value = ov.value()
    if isinstance(value, list):
        return [str(v) for v in value]
    return [ov.get_value_element_as_str()]


def _check_group_option(item: str, group: str, values: Sequence[str], extra_conf: Sequence[Path]) -> None:
    import difflib

    from dml_runner.config import group_options

    options = group_options(group)
    for conf in extra_conf:
        options += [o for o in group_options(group, conf) if o not in options]
    for value in values:
        if value in options or value in _NO_TRACKER:
            continue
        near = difflib.get_close_matches(value, options, n=1, cutoff=0.5)
        hint = f"did you mean {group}={near[0]}?" if near else f"options: {', '.join(options[:12])}"
        raise DMLRunnerError(f"{item}: {group} has no option {value!r} (conf/{group}/); {hint}")


def _compose(overrides: Sequence[str], with_hydra: bool) -> Any:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=with_hydra)


def _explain(parsed: Sequence[tuple[str, Any]], groups: set[str], err: BaseException) -> str:
    """One line for the first override that makes composition fail; Hydra's first line when none is found."""
    import difflib

    from omegaconf import DictConfig, OmegaConf

    from dml_runner.config import TOP_LEVEL_KEYS, group_options

    choices = [item for item, ov in parsed if ov.key_or_group in groups and not ov.is_sweep_override()]
    try:
        base = _compose(choices, with_hydra=False)
    except Exception:  # noqa: BLE001 - the choices alone fail: Hydra's own line below
        base = None
    for item, ov in parsed:
        key = ov.key_or_group
        if base is None or ov.is_add() or ov.is_delete() or key in groups or re.split(r"[./]", key)[0] == "hydra":
            continue
        path = key.split(".")
        node: Any = base
        for i, part in enumerate(path):
            where = ".".join(path[:i])
            if not isinstance(node, DictConfig):
                return f"{item}: {where} is a value ({OmegaConf.select(base, where)}), not a group of keys"
            if part not in node:
                if where in groups and part in group_options(where):
                    return (f"{item}: {where}={part} is not selected, so {where}.{part} does not exist; add "
                            f"{where}={part} (or {where}=[csv,{part}]) before its keys"
                            + _option_key_hint(where, part, path[i + 1:]))
                known = [str(k) for k in node.keys()] + ([*sorted(groups), *sorted(TOP_LEVEL_KEYS)] if i == 0 else [])
                near = difflib.get_close_matches(part, known, n=1, cutoff=0.5)
                what = f"an option of {where}" if where else "a config group or option of dml-run"
                hint = f"did you mean {(where + '.' if where else '')}{near[0]}?" if near else \
                    f"known: {', '.join(sorted(set(known))[:12])}"
                return f"{item}: {key} is not {what}; {hint} (dml-run --help lists them)"
            node = node[part] if isinstance(node, DictConfig) else None
        try:
            OmegaConf.update(base, key, ov.value(), merge=True)
        except Exception as bad:  # noqa: BLE001 - a schema's type check (omegaconf ValidationError)
            reason = str(bad).strip().splitlines()[0]
            return f"{item}: {reason}"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{first} (dml-run --help lists the groups and their keys)"


def _option_key_hint(group: str, option: str, rest: Sequence[str]) -> str:
    """"; did you mean ..." for a key under a group option that is not selected, from the option's own file."""
    import difflib

    from omegaconf import OmegaConf

    if not rest:
        return ""
    try:
        keys = [str(k) for k in OmegaConf.load(conf_dir() / group / f"{option}.yaml").keys()]
    except Exception:  # noqa: BLE001 - an option file that OmegaConf alone cannot read (defaults list, ...)
        return ""
    if rest[0] in keys:
        return ""
    near = difflib.get_close_matches(rest[0], [k for k in keys if not k.startswith("_")], n=1, cutoff=0.5)
    return f"; did you mean {group}.{option}.{near[0]}?" if near else ""


def _check_output_dir(cfg: Any, multirun: bool, items: Sequence[str]) -> None:
    from omegaconf import OmegaConf

    from dml_runner.rundir import unwritable_reason

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        target = Path(str(OmegaConf.select(cfg, key, throw_on_resolution_failure=True)))
    except Exception:  # noqa: BLE001 - an interpolation only Hydra's job can resolve: Hydra checks it
        return
    named = key if any(item.lstrip("+").startswith(key + "=") for item in items) else "paths.output_dir"
    reason = unwritable_reason(target)
    if reason:
        raise DMLRunnerError(f"{named}: cannot write the {'sweep' if multirun else 'run'} directory {target}: "
                             f"{reason}; set {named}=<a writable folder>")


def main() -> None:
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        print(format_help(sys.argv[1:]))
        return
    from dml_runner.training import callbacks

    sys.argv[1:] = prepare_arguments(sys.argv[1:])
    try:
        cfg = check_command_line(sys.argv[1:])
        if cfg is not None and any(arg in ("-m", "--multirun") for arg in sys.argv[1:]):
            sys.argv[1:] += continue_sweep(cfg, sys.argv[1:])
    except DMLRunnerError as err:
        print(f"dml-run: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    app()
    if callbacks.FAILED_JOBS:  # a sweep with failed jobs (listed by the sweep summary) is not a success
        raise SystemExit(1)


if __name__ == "__main__":
    main()
