#!/usr/bin/env python
"""Reproduce a paper table: resolve its rows, check the data, run a Hydra multirun (rows x seeds), then dml-report.

    python scripts/reproduce.py table1 [--seeds 3] [--data /path/to/datasets]    # HDML Table 1 (CUB-200-2011)
    python scripts/reproduce.py lifted --smoke                                    # the same pipeline on fixtures
    python scripts/reproduce.py dc --dry-run                                       # print the plan, train nothing

Targets: table1, table2, table3 (HDML CUB / Cars / SOP), lifted, dc, mdl, modern (ViT recipes); a target's rows
are the files under ``conf/experiment/<dir>/`` (``--rows 'lifted_*'`` picks some by glob). Before anything trains,
every dataset a row needs is checked under ``$DML_DATA`` (``--data``); a missing one stops the run with the
``scripts/prepare_data.py`` command. ``--smoke`` generates fixture trees (dml_runner/datasets/fixtures.py) and trains
every row's own backbone (ImageNet weights from the torchvision or Hugging Face hub cache when it holds them, else
random init with a notice), transform, sampler, loss and method for a step or two, on fewer classes per batch and
64-px crops: minutes on a CPU, numbers meaningless, pipeline identical; it prints what it shrank per row. Runs and
tables go under ``paths.output_dir`` (``--out``, ``--tables``). Extra Hydra overrides go after ``--``.
Exit status: 0 = table written; 1 = a row, dataset or job failed (the report lists failed jobs); 2 = usage error.
"""

from __future__ import annotations

import argparse
import fnmatch
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
    "lifted": {"dirs": ["lifted"], "title": "Lifted Structure (CUB, Cars, SOP)",
               "report": ["--split-by", "embedding_dim"]},
    "dc": {"dirs": ["dc"], "title": "Divide and Conquer (CUB, Cars, SOP, In-shop, VehicleID)"},
    "mdl": {"dirs": ["mdl"], "title": "MDL, reconstructed from the abstract (CUB, Cars, SOP)"},
    "modern": {"dirs": ["modern"], "title": "Modern recipe: ViT-S/16 DINO + Proxy-Anchor (CUB, Cars, SOP)"},
}
# --smoke shrinks sizes and steps only (epochs, steps, data, classes per batch, image size) and keeps the row's
# backbone and weight loading, transform, sampler and batch layout, loss, method and report.
SMOKE_STEPS = 2             # batches per epoch
SMOKE_DC_STEPS = 4          # batches per Divide and Conquer epoch: the first learners' clusters in turn (K <= 8)
SMOKE_CLASSES = 4           # classes (pairs, triplets) per batch; images per class as the row has them
SMOKE_DC_CLASSES = 2        # classes per batch within one Divide and Conquer cluster (the row: 20)
SMOKE_BATCH = 16            # a batch without a classes x images layout
SMOKE_SIDE = 64             # crop side in pixels; GoogLeNet and the ResNets (output stride 32) accept >= 32
SMOKE_TRAINER = ["trainer.progress=false", "trainer.num_workers=0", "trainer.save_checkpoints=false",
                 "trainer.amp=false", "trainer.eval_before_training=false", "tags=[smoke]"]
# Batch layouts other than classes x images: images per unit, the unit (the batch shrinks by whole units).
BATCH_UNITS = {"HDMLTripletBatchSampler": (3, "triplets [a; p; n]"), "PairStreamBatchSampler": (2, "stream pairs")}
SIZE_KEYS = ("crop", "resize", "size")  # transform arguments in pixels, scaled together with the crop


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
        return hydra_compose("config", overrides=overrides, return_hydra_config=True)


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
    from dml_runner.datasets.prepare import listed_images  # the checker's own reader: one definition of "present"

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
    """Fixture trees for every dataset the rows need, in the official layouts and big enough for the smoke batches
    (dml_runner.datasets.fixtures.SMOKE_SIZE), under ``parent``."""
    from dml_runner.datasets.fixtures import ROOT_DIRS, SMOKE_SIZE, make_tree

    parent.mkdir(parents=True, exist_ok=True)
    for name in sorted({dataset_name(c) for c in cfgs.values()}):
        if name in ROOT_DIRS and not (parent / ROOT_DIRS[name]).is_dir():
            make_tree(name, parent, SMOKE_SIZE)
    return parent


def hub_weights(arch: str) -> tuple[bool, Path]:
    """(whether torchvision's hub cache holds ``arch``'s ImageNet weights file, the path it would have)."""
    from dml_runner.backbones.torchvision_nets import hub_weights_available, hub_weights_path

    return hub_weights_available(arch), Path(hub_weights_path(arch))


def timm_smoke(backbone: Any, notes: list[str]) -> list[str]:
    """backbone=timm: weights from the Hugging Face hub cache when it holds them (else random init with a notice),
    and a SMOKE_SIDE input (backbone.img_size is transform=timm's only image-size setting)."""
    from dml_runner.backbones.timm_nets import hf_weights_path

    out, name = [], str(backbone.name)
    if backbone.get("pretrained"):
        path = hf_weights_path(name)
        if path is not None:
            notes.append(f"weights: {name} from the Hugging Face hub cache ({path})")
        else:
            out.append("backbone.pretrained=false")
            notes.append(f"NOTICE: {name} is not in the Hugging Face hub cache: backbone.pretrained=false, it starts "
                         "from RANDOM weights (set HF_HUB_CACHE to a cache that holds it)")
    out.append(f"backbone.img_size={SMOKE_SIDE}")
    notes.append(f"image: backbone.img_size {backbone.get('img_size')} -> {SMOKE_SIDE} px")
    return out


def _target(node: Any) -> str:
    return str(node.get("_target_", "")) if node is not None else ""


def smoke_overrides(row: str, cfg: Any, extra: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra overrides that shrink ``row`` to a CPU smoke run, one line per thing shrunk or changed).

    Shrunk: epochs and steps, the batch (fewer classes, the same images per class), the image size (crop and
    resize scaled together to a SMOKE_SIDE crop). Kept: backbone and its weights (ImageNet weights from the
    torchvision hub cache; where the cache lacks them, random init with a notice), transform, sampler, loss,
    method. A Divide and Conquer row keeps a divide epoch (clustering, per-learner batches) and its conquer phase.
    """
    del extra  # user overrides follow these on the command line and win (Hydra: the last value of a key)
    out, notes = list(SMOKE_TRAINER), []
    # A multirun composes its base config before the swept +experiment: a key of a group the base does not select
    # (transform.train.crop without a transform) cannot be set there. The groups these overrides touch are
    # therefore named, with the row's own choices (the composed config is the same).
    choices = cfg.hydra.runtime.choices
    out += [f"{group}={choices[group]}" for group in ("backbone", "transform", "method") if choices.get(group)]
    backbone = cfg.backbone
    arch = backbone.get("arch")
    if _target(backbone).endswith("timm_backbone"):
        out += timm_smoke(backbone, notes)
    elif backbone.get("pretrained") and arch:
        present, path = hub_weights(str(arch))
        if present:
            notes.append(f"weights: {arch} ImageNet weights from the torchvision hub cache ({path})")
        else:
            out.append("backbone.pretrained=false")
            notes.append(f"NOTICE: {path} is not in the torchvision hub cache: backbone.pretrained=false, {arch} "
                         "starts from RANDOM weights (put the file there, or set TORCH_HOME, to load it)")
    # the batch: fewer classes, the same images per class
    method = _target(cfg.get("method"))
    divide_conquer = method.endswith("DivideConquerMethod") and int(cfg.method.num_clusters) > 1
    batch = int(cfg.trainer.batch_size)
    sampler = _target(cfg.sampler).rsplit(".", 1)[-1]
    per_class = cfg.sampler.get("samples_per_class")
    if per_class or sampler == "NPairBatchSampler":
        per_class = int(per_class or 2)
        classes = min(batch // per_class, SMOKE_DC_CLASSES if divide_conquer else SMOKE_CLASSES)
        small = classes * per_class
        notes.append(f"batch: {batch} = {batch // per_class} classes x {per_class} -> {small} = {classes} x "
                     f"{per_class}" + (" (within one cluster)" if divide_conquer else ""))
    elif sampler in BATCH_UNITS:
        size, unit = BATCH_UNITS[sampler]
        small = min(batch // size, SMOKE_CLASSES) * size
        notes.append(f"batch: {batch} = {batch // size} {unit} -> {small} = {small // size} {unit}")
    else:
        small = min(batch, SMOKE_BATCH)
        notes.append(f"batch: {batch} -> {small} images")
    out.append(f"trainer.batch_size={small}")
    # the image size: every pixel size of a transform scaled with its crop
    for split in ("train", "test"):
        spec = cfg.transform.get(split) if cfg.get("transform") else None
        if not spec or not spec.get("crop") or int(spec.crop) <= SMOKE_SIDE:
            continue
        scale = SMOKE_SIDE / int(spec.crop)
        changed = []
        for key in SIZE_KEYS:
            value = spec.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                out.append(f"transform.{split}.{key}={max(1, round(value * scale))}")
                changed.append(f"{key} {value} -> {max(1, round(value * scale))}")
        notes.append(f"image ({split}): {', '.join(changed)} px")
    # epochs and steps
    epochs = int(cfg.trainer.epochs)
    if divide_conquer:
        from dml_runner.methods.divide_conquer import full_embedding_epoch

        k = int(cfg.method.num_clusters)
        steps = max(SMOKE_STEPS, min(k, SMOKE_DC_STEPS))
        out += ["trainer.epochs=3", "method.finetune_epochs=1", "trainer.eval_every=3",
                f"trainer.max_steps_per_epoch={steps}"]
        full_from = cfg.method.get("full_embedding_from", "conquer")
        if isinstance(full_from, int) and not isinstance(full_from, bool):
            out.append("method.full_embedding_from=2")  # an epoch of the row's schedule: the smoke run's second
            full_from = 2
        first_full = full_embedding_epoch(3, 1, full_from)
        phases = "divide 1 (clustering)" + (", full embedding on cluster batches 2" if first_full == 2 else
                                            ", divide 2") + ", conquer 3"
        notes.append(f"epochs: {epochs} -> 3 ({phases}; method.finetune_epochs {cfg.method.finetune_epochs} -> 1), "
                     f"at most {steps} steps per epoch (batches of {steps} of the K = {k} learners in turn)")
    else:
        out += ["trainer.epochs=1", "trainer.eval_every=1", f"trainer.max_steps_per_epoch={SMOKE_STEPS}"]
        notes.append(f"epochs: {epochs} -> 1, at most {SMOKE_STEPS} steps")
    return out, notes


def output_root(extra: list[str]) -> Path:
    """The configured ``paths.output_dir`` (the dml-run jobs run in the repository, so a relative one is under it)."""
    root = Path(str(compose([o for o in extra if o.lstrip("+").startswith("paths.")]).paths.output_dir))
    return root if root.is_absolute() else REPO / root


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
    # A real run is ONE multirun over rows x seeds. A smoke run shrinks each row by its own batch layout, image size
    # and method: one multirun per set of rows that share the same shrinking overrides.
    if smoke:
        by_overrides: dict[tuple[str, ...], list[str]] = {}
        for row, cfg in cfgs.items():
            over, notes = smoke_overrides(row, cfg, extra)
            print(f"SMOKE {row}: " + "; ".join(notes))
            by_overrides.setdefault(tuple(over), []).append(row)
        groups = [(members, list(over), sweep_root / f"group{i}")
                  for i, (over, members) in enumerate(by_overrides.items())]
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
    p.add_argument("--smoke", action="store_true",
                   help="fixture data, a step or two, small batches and crops, the rows' own components (CPU, minutes)")
    p.add_argument("--rows", help="comma-separated globs over the row file names, e.g. 'lifted_*,*_cub200'")
    p.add_argument("--out", help="sweep directory (default <paths.output_dir>/reproduce/<target>[-smoke]/<time>)")
    p.add_argument("--tables", help="report directory (default <paths.output_dir>/tables/<target>[-smoke])")
    p.add_argument("--skip-unavailable", action="store_true", help="leave out rows whose options do not exist yet")
    p.add_argument("--dry-run", action="store_true", help="check rows and data, print the commands, train nothing")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    name = args.target + ("-smoke" if args.smoke else "")
    outputs = output_root(extra) if not (args.out and args.tables) else REPO
    sweep_root = Path(args.out or outputs / "reproduce" / name / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    tables = Path(args.tables or outputs / "tables" / name).resolve()
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
    from dml_runner.cli.report import main as report_main

    report_args = [str(sweep_root), "--out", str(tables), *TARGETS[args.target].get("report", [])]
    print("$ dml-report " + " ".join(report_args))
    code = report_main(report_args)
    summaries = list(sweep_root.rglob("summary.csv"))
    any_failed = any("failed" in s.read_text() for s in summaries)
    return 1 if code or failed_launch or any_failed else 0


if __name__ == "__main__":
    sys.exit(main())
