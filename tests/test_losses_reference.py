"""Brute-force (Python-loop, float64) reference implementations of the losses and shared test helpers (no tests)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def dist(x: Tensor, i: int, j: int, squared: bool = False) -> Tensor:
    sq = ((x[i] - x[j]) ** 2).sum()
    return sq if squared else sq.sqrt()


def pairs(labels: list[int], positive: bool) -> list[tuple[int, int]]:
    n = len(labels)
    return [(i, j) for i in range(n) for j in range(n) if i != j and (labels[i] == labels[j]) == positive]


def contrastive(x: Tensor, labels: list[int], margin: float, squared: bool, reduction: str) -> Tensor:
    pos_terms, neg_terms = [], []
    for i, j in pairs(labels, True):
        pos_terms.append(dist(x, i, j, squared=True) if squared else dist(x, i, j))
    for i, j in pairs(labels, False):
        h = torch.relu(margin - dist(x, i, j))
        neg_terms.append(h**2 if squared else h)
    if reduction == "mean":
        terms = pos_terms + neg_terms
        return torch.stack(terms).sum() / max(len(terms), 1) if terms else x.sum() * 0
    return nonzero_mean(pos_terms, x) + nonzero_mean(neg_terms, x)


def nonzero_mean(terms: list[Tensor], x: Tensor) -> Tensor:
    if not terms:
        return x.sum() * 0
    t = torch.stack(terms)
    return t.sum() / max(int((t > 0).sum()), 1)


def mean(terms: list[Tensor], x: Tensor) -> Tensor:
    return torch.stack(terms).mean() if terms else x.sum() * 0


def triplets(x: Tensor, labels: list[int], mining: str, squared: bool = False) -> list[tuple[int, int, int]]:
    n = len(labels)
    d = [[float(dist(x.detach(), i, j, squared)) for j in range(n)] for i in range(n)]
    out = []
    if mining == "all":
        for a, p in pairs(labels, True):
            out += [(a, p, k) for k in range(n) if labels[k] != labels[a]]
    elif mining == "semihard":
        for a, p in pairs(labels, True):
            negs = [k for k in range(n) if labels[k] != labels[a]]
            if not negs:
                continue
            outside = [k for k in negs if d[a][k] > d[a][p]]
            if outside:
                out.append((a, p, min(outside, key=lambda k: d[a][k])))
            else:
                out.append((a, p, max(negs, key=lambda k: d[a][k])))
    elif mining == "hard":
        for a in range(n):
            ps = [k for k in range(n) if k != a and labels[k] == labels[a]]
            negs = [k for k in range(n) if labels[k] != labels[a]]
            if ps and negs:
                out.append((a, max(ps, key=lambda k: d[a][k]), min(negs, key=lambda k: d[a][k])))
    return out


def triplet(x: Tensor, labels: list[int], margin: float, mining: str, squared: bool, reduction: str) -> Tensor:
    terms = [
        torch.relu(dist(x, a, p, squared) - dist(x, a, k, squared) + margin)
        for a, p, k in triplets(x, labels, mining, squared)
    ]
    return mean(terms, x) if reduction == "mean" else nonzero_mean(terms, x)


def logsumexp(values: list[Tensor]) -> Tensor:
    return torch.logsumexp(torch.stack(values), dim=0)


__all__ = ["contrastive", "triplet", "triplets", "dist", "pairs", "mean", "nonzero_mean", "logsumexp", "math"]
