"""Forward + backward time of every loss next to its pytorch-metric-learning counterpart.

Usage: .venv/bin/python scripts/bench_losses.py [--batches 128 512] [--dim 512] [--threads 2] [--repeats 15]

Each batch is N classes x 2 (the npair sampler's layout) of L2-normalised random embeddings. Times are medians of
``--repeats`` runs (after warm-up; the minimum is printed too) of loss(emb, labels).backward(); pairs are timed interleaved in the same run, so
the ratio pml / ours is what to read (absolute times on these machines are noisy). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from pytorch_metric_learning import losses as pml
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.distances import DotProductSimilarity, LpDistance
from pytorch_metric_learning.reducers import MeanReducer
from pytorch_metric_learning.regularizers import LpRegularizer

from dml_runner import losses as ours


def _lp() -> LpDistance:
    return LpDistance(normalize_embeddings=False, p=2, power=1)


def _with_miner(miner, loss) -> Callable:
    return lambda e, y: loss(e, y, miner(e, y))


def cases() -> list[tuple[str, Callable, Callable]]:
    """(name, ours, pml counterpart with the closest matching settings)."""
    return [
        ("contrastive", ours.ContrastiveLoss(squared=False, reduction="nonzero_mean"),
         pml.ContrastiveLoss(pos_margin=0, neg_margin=1, distance=_lp())),
        ("triplet (all)", ours.TripletLoss(mining="all", reduction="nonzero_mean"),
         pml.TripletMarginLoss(margin=0.2, distance=_lp())),
        ("triplet (semihard)", ours.TripletLoss(mining="semihard"),
         _with_miner(pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard", distance=_lp()),
                     pml.TripletMarginLoss(margin=0.2, distance=_lp(), reducer=MeanReducer()))),
        ("triplet (hard)", ours.TripletLoss(mining="hard"),
         _with_miner(pml_miners.BatchHardMiner(distance=_lp()),
                     pml.TripletMarginLoss(margin=0.2, distance=_lp(), reducer=MeanReducer()))),
        ("ddml (vs pml contrastive)", ours.DDMLLoss(),
         pml.ContrastiveLoss(pos_margin=0, neg_margin=1, distance=_lp())),
        ("lifted", ours.LiftedStructureLoss(), pml.LiftedStructureLoss(neg_margin=1, pos_margin=0, distance=_lp())),
        ("npair", ours.NPairLoss(l2_reg=3e-3),
         pml.NPairsLoss(distance=DotProductSimilarity(normalize_embeddings=False),
                        embedding_regularizer=LpRegularizer(power=2), embedding_reg_weight=1.5e-3)),
        ("angular", ours.AngularLoss(alpha=45.0), pml.AngularLoss(alpha=45)),
        ("angular_npair (vs pml angular + npairs)", ours.AngularNPairLoss(),
         _sum(pml.NPairsLoss(distance=DotProductSimilarity(normalize_embeddings=False)),
              pml.AngularLoss(alpha=45), 2.0)),
        ("margin (distance weighted)", ours.MarginLoss(),
         _with_miner(pml_miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4),
                     pml.MarginLoss(margin=0.2, beta=1.2, learn_beta=True, distance=_lp()))),
        ("margin (closest, D&C)", ours.MarginLoss(sampling="closest"),
         _with_miner(pml_miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4),
                     pml.MarginLoss(margin=0.2, beta=1.2, learn_beta=True, distance=_lp()))),
        ("mdl (vs pml generalized lifted)", ours.MarginDiscriminateLoss(),
         pml.GeneralizedLiftedStructureLoss(neg_margin=1, pos_margin=0, distance=_lp())),
    ]


def _sum(first, second, weight: float) -> Callable:
    return lambda e, y: first(e, y) + weight * second(e, y)


def _time_once(fn: Callable, emb: torch.Tensor, labels: torch.Tensor) -> float:
    x = emb.detach().clone().requires_grad_(True)
    start = time.perf_counter()
    fn(x, labels).backward()
    return time.perf_counter() - start


def bench(batch: int, dim: int, repeats: int, warmup: int = 3, slow_s: float = 0.5) -> dict[str, list]:
    """Forward+backward seconds per case, ``{"median": [(name, ours, pml)], "min": [...]}``; a case slower than
    ``slow_s`` per call (pml's lifted loss at batch 512 takes 10-20 s) gets 3 timed runs instead of ``repeats``."""
    g = torch.Generator().manual_seed(batch)
    emb = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=1)
    labels = torch.randperm(batch // 2, generator=g).repeat_interleave(2)
    rows: dict[str, list] = {"median": [], "min": []}
    for name, fn_ours, fn_pml in cases():
        first = max(_time_once(fn_ours, emb, labels), _time_once(fn_pml, emb, labels))
        slow = first > slow_s
        for _ in range(0 if slow else warmup):
            _time_once(fn_ours, emb, labels)
            _time_once(fn_pml, emb, labels)
        t_ours, t_pml = [], []
        for _ in range(3 if slow else repeats):  # interleaved so drifts in machine load hit both alike
            t_ours.append(_time_once(fn_ours, emb, labels))
            t_pml.append(_time_once(fn_pml, emb, labels))
        rows["median"].append((name, statistics.median(t_ours), statistics.median(t_pml)))
        rows["min"].append((name, min(t_ours), min(t_pml)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {b: bench(b, args.dim, args.repeats) for b in args.batches}
    for stat in ("median", "min"):
        print(f"\n{stat} of {args.repeats} interleaved runs (3 for a side slower than 0.5 s)\n")
        print("| loss (pml counterpart) |" + "".join(
            f" ours ms @{b} | pml ms @{b} | pml/ours @{b} |" for b in args.batches))
        print("|---" * (1 + 3 * len(args.batches)) + "|")
        for i, (name, _, _) in enumerate(results[args.batches[0]][stat]):
            cells = ""
            for b in args.batches:
                _, t_ours, t_pml = results[b][stat][i]
                cells += f" {t_ours * 1e3:.2f} | {t_pml * 1e3:.2f} | {t_pml / t_ours:.1f}x |"
            print(f"| {name} |{cells}")
    print(f"\nbatch N classes x 2, dim {args.dim}, torch {torch.__version__}, {args.threads} threads")

if __name__ == "__main__":
    main()
