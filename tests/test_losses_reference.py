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




def ddml(x: Tensor, labels: list[int], tau: float, beta: float) -> Tensor:
    terms = []
    for positive in (True, False):
        for i, j in pairs(labels, positive):
            l_ij = 1.0 if positive else -1.0
            z = 1.0 - l_ij * (tau - dist(x, i, j, squared=True))
            terms.append(torch.log1p(torch.exp(beta * z)) / beta)
    return mean(terms, x)


def lifted(x: Tensor, labels: list[int], margin: float) -> Tensor:
    n, total, num_pairs = len(labels), x.sum() * 0, 0
    for i in range(n):
        for j in range(i + 1, n):
            if labels[i] != labels[j]:
                continue
            num_pairs += 1
            terms = [margin - dist(x, i, k) for k in range(n) if labels[k] != labels[i]]
            terms += [margin - dist(x, j, k) for k in range(n) if labels[k] != labels[j]]
            if terms:
                total = total + torch.relu(logsumexp(terms) + dist(x, i, j)) ** 2
    return total / (2 * max(num_pairs, 1))


def generalized_lifted(x: Tensor, labels: list[int], margin: float) -> Tensor:
    """Hermans et al. 2017, p. 4: per anchor relu(LSE_p D_ap + LSE_n (margin - D_an)), mean over anchors."""
    n, terms = len(labels), []
    for a in range(n):
        ps = [dist(x, a, p) for p in range(n) if p != a and labels[p] == labels[a]]
        ns = [margin - dist(x, a, k) for k in range(n) if labels[k] != labels[a]]
        terms.append(torch.relu((logsumexp(ps) if ps else 0) + (logsumexp(ns) if ns else 0)))
    return mean(terms, x)


def first_two_per_class(labels: list[int]) -> tuple[list[int], list[int]]:
    anchors, positives = [], []
    for c in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == c]
        if len(members) >= 2:
            anchors.append(members[0])
            positives.append(members[1])
    return anchors, positives


def npair(x: Tensor, labels: list[int], l2_reg: float) -> Tensor:
    anchors, positives = first_two_per_class(labels)
    terms = []
    for i, a in enumerate(anchors):
        logits = [x[a] @ x[p] for p in positives]
        terms.append(logsumexp(logits) - logits[i])
    reg = 0.25 * l2_reg * (
        mean([(x[a] ** 2).sum() for a in anchors], x) + mean([(x[p] ** 2).sum() for p in positives], x)
    )
    return mean(terms, x) + reg


def angular(x: Tensor, labels: list[int], alpha_degrees: float) -> Tensor:
    x = x / x.norm(dim=1, keepdim=True)
    t = math.tan(math.radians(alpha_degrees)) ** 2
    terms = []
    for a, p in pairs(labels, True):
        fs = [
            4 * t * (x[a] + x[p]) @ x[k] - 2 * (1 + t) * x[a] @ x[p]
            for k in range(len(labels))
            if labels[k] != labels[a]
        ]
        terms.append(torch.log1p(torch.stack(fs).exp().sum()) if fs else x.sum() * 0)
    return mean(terms, x)


def margin(x, labels, triplets, alpha, beta, nu):
    """beta: a callable anchor -> boundary tensor."""
    pos_terms, neg_terms, reg = [], [], x.sum() * 0
    for a, p, k in triplets:
        pos_terms.append(torch.relu(dist(x, a, p) - beta(a) + alpha))
        neg_terms.append(torch.relu(beta(a) - dist(x, a, k) + alpha))
        reg = reg + nu * beta(a)
    terms = pos_terms + neg_terms
    if not terms:
        return x.sum() * 0
    count = sum(int(t > 0) for t in terms)
    return (torch.stack(terms).sum() + reg) / max(count, 1)


def mdl(x: Tensor, labels: list[int], margin_: float, gamma: float) -> Tensor:
    n, terms = len(labels), []
    for a in range(n):
        ps = [gamma * dist(x, a, p) for p in range(n) if p != a and labels[p] == labels[a]]
        ns = [-gamma * dist(x, a, k) for k in range(n) if labels[k] != labels[a]]
        if ps and ns:
            terms.append(torch.relu(logsumexp(ps) / gamma + logsumexp(ns) / gamma + margin_))
    return mean(terms, x)


def distance_weighted_probabilities(x, labels, cutoff, nonzero_loss_cutoff):
    n, dim = len(labels), x.shape[1]
    rows = []
    for a in range(n):
        w = []
        for k in range(n):
            d = float(dist(x.detach(), a, k))
            if labels[k] == labels[a] or d >= nonzero_loss_cutoff:
                w.append(0.0)
                continue
            d = max(d, cutoff)
            w.append(math.exp((2 - dim) * math.log(d) - (dim - 3) / 2 * math.log(1 - d * d / 4)))
        total = sum(w)
        if total == 0:
            w = [float(labels[k] != labels[a]) for k in range(n)]
            total = sum(w)
        rows.append([v / total if total else 0.0 for v in w])
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------- shared test helpers

ATOL = 2e-5


def batch(seed: int = 0, n: int = 12, dim: int = 6, classes: int = 4, normalize: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    labels = torch.randint(0, classes, (n,), generator=g)
    return x.requires_grad_(True), labels


def npair_batch(seed: int = 0, classes: int = 6, dim: int = 6, normalize: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * classes, dim, generator=g, dtype=torch.float64)
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    labels = torch.randperm(classes, generator=g).repeat_interleave(2)
    return x.requires_grad_(True), labels


def value_and_grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach().double(), grad.double()


def assert_matches(ours, reference, x, atol=ATOL):
    v1, g1 = value_and_grad(ours, x)
    v2, g2 = value_and_grad(reference, x)
    torch.testing.assert_close(v1, v2, atol=atol, rtol=1e-4)
    torch.testing.assert_close(g1, g2, atol=atol, rtol=1e-4)
