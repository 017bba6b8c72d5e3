"""Resolved configs of every experiment and group option, to prove a refactoring of conf/ changes no value.

    python tests/config_snapshot.py dump OUT_DIR [--conf CONF_DIR]   # one JSON file per composition
    python tests/config_snapshot.py compare BEFORE_DIR AFTER_DIR      # the keys whose values differ

A paper row's deviations compare as one set: those of its table's base (``reference.table_deviations``) and its own
(``reference.deviations``), in any order, as dml-report shows them.

``--conf`` composes another conf/ tree (e.g. one with the config files of an earlier commit); the schemas
registered by ``dml_runner.config`` apply to both. ``$DML_DATA`` is unset while composing, so data paths resolve to
their default."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

# Group options composed on their own (``group=option``); the experiments are composed with ``+experiment=``.
GROUPS = ("dataset", "transform", "backbone", "loss", "sampler", "optimizer", "scheduler", "method", "trainer")
# Documented commands (README, docs) whose composed config must not change.
COMMANDS = (("loss=hdml_npair", "dataset=cars196"), ("loss=hdml_triplet", "dataset=cub200"),
            ("loss=hdml_npair", "loss.pulling_factor=30"), ("method=hdml", "loss=hdml_npair"),
            ("method=divide_conquer",), ("dataset=cars196", "sampler=npair", "loss=npair"))


def selectable(path: Path, group_dir: Path) -> bool:
    """A config file a user selects: no part of its path under the group starts with ``_`` (those are bases).
    The rule of ``dml_runner.config.group_options``, for any conf tree (``--conf``), not only the package's."""
    return not any(part.startswith("_") for part in path.relative_to(group_dir).parts)


def compositions(conf: Path) -> dict[str, list[str]]:
    """{file name: overrides} for every experiment, every option of GROUPS and every command of COMMANDS."""
    out: dict[str, list[str]] = {}
    exp = conf / "experiment"
    for path in sorted(exp.rglob("*.yaml")):
        if selectable(path, exp):
            name = str(path.relative_to(exp).with_suffix(""))
            out["experiment=" + name.replace("/", "+")] = [f"+experiment={name}"]
    for group in GROUPS:
        for path in sorted((conf / group).rglob("*.yaml")):
            if selectable(path, conf / group):
                option = str(path.relative_to(conf / group).with_suffix(""))
                out[f"{group}={option.replace('/', '+')}"] = [f"{group}={option}"]
    for command in COMMANDS:
        out["cmd=" + "__".join(command).replace("/", "+")] = list(command)
    return out


def resolve(conf: Path, overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dml_runner.config import register_configs

    register_configs()
    with initialize_config_dir(str(conf.resolve()), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=False)
    return OmegaConf.to_container(cfg, resolve=True)


def dump(out_dir: Path, conf: Path) -> None:
    os.environ.pop("DML_DATA", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, overrides in compositions(conf).items():
        try:
            value: Any = resolve(conf, overrides)
        except Exception as err:  # noqa: BLE001 - a refused composition is recorded as such and compared too
            value = {"__error__": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
        (out_dir / f"{name}.json").write_text(json.dumps(value, indent=1, sort_keys=True, default=str))


def differences(before: Any, after: Any, path: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for key in sorted(set(before) | set(after), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in after:
                out.append(f"{where}: removed")
            elif key not in before:
                out.append(f"{where}: added")
            else:
                out += differences(before[key], after[key], where)
        return out
    return [] if before == after else [f"{path}: {before!r} -> {after!r}"]


def normalised(value: Any) -> Any:
    """A composition as the report reads it: a paper row's deviations are one set, wherever they are stated (the
    table's base, ``reference.table_deviations``, or the row, ``reference.deviations``) and in whatever order."""
    ref = value.get("reference") if isinstance(value, dict) else None
    if isinstance(ref, dict) and ("deviations" in ref or "table_deviations" in ref):
        ref = dict(ref)
        ref["deviations"] = sorted({*(ref.pop("table_deviations", None) or []), *(ref.get("deviations") or [])})
        value = {**value, "reference": ref}
    return value


def compare(before_dir: Path, after_dir: Path) -> int:
    before = {p.name: p for p in before_dir.glob("*.json")}
    after = {p.name: p for p in after_dir.glob("*.json")}
    changed = 0
    for name in sorted(set(before) | set(after)):
        if name not in after or name not in before:
            print(f"{name}: only in {'before' if name in before else 'after'}")
            changed += 1
            continue
        diff = differences(normalised(json.loads(before[name].read_text())),
                           normalised(json.loads(after[name].read_text())))
        if diff:
            changed += 1
            print(f"{name}:\n  " + "\n  ".join(diff))
    print(f"{len(set(before) | set(after))} compositions, {changed} differ")
    return 1 if changed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("out", type=Path)
    d.add_argument("--conf", type=Path, default=Path(__file__).resolve().parent.parent / "conf")
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "dump":
        dump(args.out, args.conf)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
