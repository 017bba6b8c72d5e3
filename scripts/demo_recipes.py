#!/usr/bin/env python
"""Measure candidate recipes for the embedded digits demo (`make run`): untrained vs final test metrics per seed.

    python scripts/demo_recipes.py                       # every recipe below x seeds 0-4, the current CPU path
    python scripts/demo_recipes.py --recipes default --seeds 0 1 2 3 4 --cpu-path fp32
    python scripts/demo_recipes.py --out docs-table.md   # also write the Markdown table

A recipe passes when, for every seed, the final epoch is at least as good as the untrained network on R@1, MAP@R and
NMI (the demo must show what training does on unseen classes). Each run is a real `dml-run` subprocess with the
recipe's overrides; `--cpu-path` sets DML_CPU_PATH for it (the evaluation's CPU path, docs/EVALUATION.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> overrides on top of the defaults (dataset=digits with conf/preset/digits.yaml)
RECIPES: dict[str, list[str]] = {
    # class-disjoint: train on digits 0-4, retrieve 5-9
    "classes_30ep": ["dataset.protocol=classes", "trainer.epochs=30"],
    "classes_10ep": ["dataset.protocol=classes", "trainer.epochs=10"],
    "classes_5ep": ["dataset.protocol=classes", "trainer.epochs=5"],
    "classes_10ep_shift2": ["dataset.protocol=classes", "trainer.epochs=10", "dataset.max_shift=2"],
    "classes_10ep_semihard": ["dataset.protocol=classes", "trainer.epochs=10", "loss.mining=semihard"],
    "classes_10ep_wd": ["dataset.protocol=classes", "trainer.epochs=10", "optimizer.weight_decay=5e-4"],
    "classes_0-6_7-9": ["dataset.protocol=classes", "trainer.epochs=10", "dataset.train_classes=[0,1,2,3,4,5,6]",
                        "dataset.test_classes=[7,8,9]", "trainer.batch_size=28"],
    # held-out images of all ten digits (the default protocol)
    "images_default": [],
    "images_30ep": ["trainer.epochs=30"],
}
KEYS = ("recall@1", "map@r", "nmi")


def run_one(overrides: list[str], seed: int, cpu_path: str | None, workdir: Path) -> dict:
    out = workdir / f"s{seed}_{abs(hash(tuple(overrides))) % 10**8}"
    cmd = [str(Path(sys.executable).with_name("dml-run")), f"trainer.seed={seed}", "trainer.progress=false",
           "trainer.save_checkpoints=false", f"hydra.run.dir={out}", *overrides]
    env = dict(os.environ)
    if cpu_path:
        env["DML_CPU_PATH"] = cpu_path
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"dml-run failed for {overrides} seed {seed}:\n{proc.stderr[-2000:]}")
    res = json.loads((out / "results.json").read_text())
    return {"untrained": res["untrained_metrics"], "final": res["metrics"], "wall_s": time.time() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--cpu-path", choices=["auto", "bf16", "fp32"], default=None)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [f"CPU: {cpu}; DML_CPU_PATH={args.cpu_path or 'unset (auto)'}", "",
             "| recipe | overrides | seeds | min gain R@1 | min gain MAP@R | min gain NMI | mean final R@1 / MAP@R / NMI "
             "| mean wall s | passes |", "|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="demo_recipes_") as tmp:
        for name in args.recipes:
            runs = [run_one(RECIPES[name], s, args.cpu_path, Path(tmp)) for s in args.seeds]
            gains = {k: [100 * (r["final"][k] - r["untrained"][k]) for r in runs] for k in KEYS}
            finals = {k: sum(100 * r["final"][k] for r in runs) / len(runs) for k in KEYS}
            ok = all(g >= 0 for k in KEYS for g in gains[k])
            wall = sum(r["wall_s"] for r in runs) / len(runs)
            lines.append(f"| {name} | `{' '.join(RECIPES[name]) or '(defaults)'}` | {len(runs)} | "
                         + " | ".join(f"{min(gains[k]):+.1f}" for k in KEYS)
                         + f" | {' / '.join(f'{finals[k]:.1f}' for k in KEYS)} | {wall:.0f} | {'yes' if ok else 'no'} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
