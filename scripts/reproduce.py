#!/usr/bin/env python
"""Reproduce a paper table: resolve its rows, check the data, run a Hydra multirun (rows x seeds), then dml-report.

    python scripts/reproduce.py table1 [--seeds 3] [--data /path/to/datasets]    # HDML Table 1 (CUB-200-2011)
    python scripts/reproduce.py lifted --smoke                                    # the same pipeline on fixtures
    python scripts/reproduce.py dc --dry-run                                       # print the plan, train nothing

Targets: table1, table2, table3 (HDML CUB / Cars / SOP), lifted, dc, mdl; a target's rows are the files under
``conf/experiment/<dir>/`` (``--rows 'lifted_*'`` picks some by glob). Before anything trains, every dataset a row
needs is checked under ``$DML_DATA`` (``--data``); a missing one stops the run with the ``scripts/prepare_data.py``
command. ``--smoke`` generates fixture trees (tests/datasets_fixtures.py) and trains small_cnn with trainer=smoke
for a step or two: minutes on a CPU, numbers meaningless, pipeline identical. Extra Hydra overrides go after ``--``.
Exit status: 0 = table written; 1 = a row, dataset or job failed (the report lists failed jobs); 2 = usage error.
"""

from __future__ import annotations

import argparse
import fnmatch
import inspect
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TARGETS: dict[str, dict[str, Any]] = {
    "table1": {"dirs": ["hdml/table1_cub200"], "title": "HDML Table 1 (CUB-200-2011)"},
    "table2": {"dirs": ["hdml/table2_cars196"], "title": "HDML Table 2 (Cars196)"},
    "table3": {"dirs": ["hdml/table3_sop"], "title": "HDML Table 3 (Stanford Online Products)"},
    "lifted": {"dirs": ["lifted"], "title": "Lifted Structure (CUB, Cars, SOP)", "report": ["--split-by", "embedding_dim"]},
    "dc": {"dirs": ["dc"], "title": "Divide and Conquer (CUB, Cars, SOP, In-shop, VehicleID)"},
    "mdl": {"dirs": ["mdl"], "title": "MDL, reconstructed from the abstract (CUB, Cars, SOP)"},
}
SMOKE_TRAINER = ["trainer=smoke", "trainer.epochs=1", "trainer.max_steps_per_epoch=2", "trainer.batch_size=6",
                 "trainer.eval_every=1", "trainer.progress=false", "trainer.num_workers=0",
                 "trainer.save_checkpoints=false", "trainer.amp=false", "tags=[smoke]"]


class PlanError(Exception):
    """A row or a dataset is not ready: nothing was trained."""


def conf_dir() -> Path:
    from dml_runner.config import conf_dir as _conf_dir

    return _conf_dir()


def target_rows(target: str, pattern: str | None = None) -> list[str]:
    """Experiment names (``hdml/table1_cub200/npair``) of a target, sorted; ``pattern`` globs the file stem."""
    rows = []
    for sub in TARGETS[target]["dirs"]:
        for path in sorted((conf_dir() / "experiment" / sub).glob("*.yaml")):
            if pattern is None or any(fnmatch.fnmatch(path.stem, p) for p in pattern.split(",")):
                rows.append(f"{sub}/{path.stem}")
    return rows


def compose(overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dml_runner.config import register_configs

    register_configs()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def resolve_rows(rows: list[str], extra: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Compose every row; returns ({row: cfg}, {row: why it cannot be composed})."""
    ok, broken = {}, {}
    for row in rows:
        try:
            ok[row] = compose([f"+experiment={row}", *extra])
        except Exception as err:  # noqa: BLE001 - e.g. a method option that does not exist yet
            broken[row] = str(err).splitlines()[0]
    return ok, broken


def dataset_name(cfg: Any) -> str:
    return str(cfg.dataset._target_).split(".")[-2]  # dml_runner.datasets.<name>.build


def check_data(cfgs: dict[str, Any]) -> list[str]:
    """One message per dataset that is missing or incomplete (split files unreadable) under its configured root."""
    sys.path.insert(0, str(REPO / "scripts"))
    from prepare_data import listed_images  # the checker's own reader: one definition of "present"

    problems, seen = [], set()
    for cfg in cfgs.values():
        name = dataset_name(cfg)
        if name == "digits" or name in seen:
            continue
        seen.add(name)
        root = Path(str(cfg.dataset.root))
        try:
            listed_images(name, root)
        except Exception as err:  # noqa: BLE001 - DMLRunnerError or a parse error: not ready either way
            problems.append(f"dataset {name} is not ready at {root}: {err}\n"
                            f"    prepare it:  python scripts/prepare_data.py {name} {root}\n"
                            f"    sources:     python scripts/prepare_data.py --sources\n"
                            f"    then point DATA (or $DML_DATA, or --data) at the directory that holds {root.name}/")
    return problems


def make_fixtures(cfgs: dict[str, Any], parent: Path) -> Path:
    """Fixture trees for every dataset the rows need, in the official layouts, under ``parent``."""
    sys.path.insert(0, str(REPO / "tests"))
    from datasets_fixtures import MAKERS

    parent.mkdir(parents=True, exist_ok=True)
    for name in sorted({dataset_name(c) for c in cfgs.values()}):
        if name in MAKERS and not _fixture_exists(parent, name):
            MAKERS[name](parent)
    return parent


def _fixture_exists(parent: Path, name: str) -> bool:
    dirs = {"cub200": "CUB_200_2011", "cars196": "cars196", "sop": "Stanford_Online_Products", "inshop": "InShop",
            "vehicleid": "VehicleID_V1.0", "folder": "my_images"}
    return (parent / dirs[name]).is_dir()


def smoke_overrides(row: str, cfg: Any, extra: list[str]) -> list[str]:
    """Overrides that turn a row into a CPU smoke run: small_cnn, a couple of steps, small crops, tiny batches.

    The paper's backbone keys that small_cnn does not take (``pretrained``, ``freeze``, ...) are deleted.
    """
    from dml_runner.backbones import small_cnn

    out = ["backbone=small_cnn", *SMOKE_TRAINER]
    accepted = set(inspect.signature(small_cnn).parameters)
    small = compose([f"+experiment={row}", "backbone=small_cnn", *extra]).backbone
    out += [f"~backbone.{k}" for k in small if k not in accepted and k != "_target_"]
    if "samples_per_class" in cfg.sampler:
        out.append("sampler.samples_per_class=2")
    for split in ("train", "test"):
        spec = cfg.transform.get(split)
        if spec:
            if "crop" in spec:
                out.append(f"transform.{split}.crop=32")
            if "resize" in spec:
                out.append(f"transform.{split}.resize=36")
    if cfg.get("method") and "num_clusters" in cfg.method:
        out.append("method.num_clusters=2")
    return out


def dml_run_cmd() -> list[str]:
    script = Path(sys.executable).with_name("dml-run")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dml_runner"]


def plan(target: str, seeds: int, smoke: bool, rows_glob: str | None, extra: list[str], sweep_root: Path,
         skip_unavailable: bool) -> tuple[list[list[str]], list[str]]:
    """The multirun commands (one in a real run, one per row in a smoke run) and the rows left out."""
    rows = target_rows(target, rows_glob)
    if not rows:
        raise PlanError(f"no experiment files for target {target} (pattern {rows_glob!r}) under "
                        f"{conf_dir() / 'experiment'}")
    cfgs, broken = resolve_rows(rows, extra)
    if broken and not skip_unavailable:
        lines = "\n".join(f"  {r}: {why}" for r, why in broken.items())
        raise PlanError(f"{len(broken)} row(s) of {target} cannot be composed (an option they need is missing):\n"
                        f"{lines}\nfix them, or pass --skip-unavailable to reproduce the other rows (the table then "
                        "shows the missing ones as paper only)")
    if not cfgs:
        raise PlanError(f"no row of {target} can be composed")
    if smoke:
        make_fixtures(cfgs, Path(os.environ["DML_DATA"]))
    problems = check_data(cfgs)
    if problems:
        raise PlanError("missing data, nothing was trained:\n" + "\n".join(problems))
    # A real run is ONE multirun over rows x seeds. A smoke run deletes the paper backbone's keys (~backbone.x),
    # which Hydra cannot do while the experiment itself is swept: there, one multirun per row (over the seeds).
    if smoke:
        groups = [([row], smoke_overrides(row, cfg, extra), sweep_root / row.replace("/", "__"))
                  for row, cfg in cfgs.items()]
    else:
        groups = [(list(cfgs), [], sweep_root)]
    commands = []
    for members, over, sweep in groups:
        commands.append([*dml_run_cmd(), "-m", "+experiment=" + ",".join(members),
                         "trainer.seed=" + ",".join(str(s) for s in range(seeds)), f"hydra.sweep.dir={sweep}",
                         *over, *extra])
    return commands, sorted(broken)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    p = argparse.ArgumentParser(prog="reproduce.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", choices=sorted(TARGETS))
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per row (default 3)")
    p.add_argument("--data", help="directory holding the dataset directories (sets $DML_DATA)")
    p.add_argument("--smoke", action="store_true", help="fixture data, small_cnn, trainer=smoke (CPU, minutes)")
    p.add_argument("--rows", help="comma-separated globs over the row file names, e.g. 'lifted_*,*_cub200'")
    p.add_argument("--out", help="sweep directory (default outputs/reproduce/<target>[-smoke]/<time>)")
    p.add_argument("--tables", help="report directory (default outputs/tables/<target>[-smoke])")
    p.add_argument("--skip-unavailable", action="store_true", help="leave out rows whose options do not exist yet")
    p.add_argument("--dry-run", action="store_true", help="check rows and data, print the commands, train nothing")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    name = args.target + ("-smoke" if args.smoke else "")
    sweep_root = Path(args.out or REPO / "outputs" / "reproduce" / name / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    tables = Path(args.tables or REPO / "outputs" / "tables" / name).resolve()
    if args.smoke:
        os.environ["DML_DATA"] = str(sweep_root / "fixtures")
    elif args.data:
        os.environ["DML_DATA"] = str(Path(args.data).resolve())
    print(f"reproduce {args.target}: {TARGETS[args.target]['title']}" + (" [SMOKE]" if args.smoke else ""))
    try:
        commands, skipped = plan(args.target, args.seeds, args.smoke, args.rows, extra, sweep_root,
                                 args.skip_unavailable)
    except PlanError as err:
        print(f"reproduce.py: error: {err}", file=sys.stderr)
        return 1
    if skipped:
        print(f"WARNING: left out (cannot be composed yet): {', '.join(skipped)}", file=sys.stderr)
    for cmd in commands:
        print("$ " + " ".join(cmd))
    if args.dry_run:
        return 0
    failed_launch = False
    for cmd in commands:
        failed_launch |= subprocess.run(cmd, cwd=REPO, env=os.environ.copy()).returncode != 0
    from dml_runner.report import main as report_main

    report_args = [str(sweep_root), "--out", str(tables), *TARGETS[args.target].get("report", [])]
    print("$ dml-report " + " ".join(report_args))
    code = report_main(report_args)
    summaries = list(sweep_root.rglob("summary.csv"))
    any_failed = any("failed" in s.read_text() for s in summaries)
    return 1 if code or failed_launch or any_failed else 0


if __name__ == "__main__":
    sys.exit(main())
