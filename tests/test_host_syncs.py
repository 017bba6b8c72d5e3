"""Training steps read nothing back from the device (on CUDA each read waits for the GPU): HDML's step and the
trainer's loop between its NaN-guard reads. On the CPU a read is counted by patching the tensor methods that copy a
value to the host; the device-side replacements give the numbers the host-side decisions gave."""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

from test_hdml import NPAIR, TRIPLET, build_trainer, npair_batch, toy_hdml

READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist")


@contextlib.contextmanager
def counted_host_reads():
    """The host reads of tensor values that dml_runner's own code makes inside the block (the method names; torch's
    reads of its CPU-side counters, such as Adam's step, are not device reads)."""
    reads: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if f"{os.sep}dml_runner{os.sep}" in caller:
                reads.append(name)
            return originals[name](self, *args, **kwargs)
        return read

    for name in READS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield reads
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def test_hdml_npair_step_reads_nothing_from_the_device(compose_cfg, tmp_path):
    trainer = build_trainer(compose_cfg, tmp_path, *NPAIR)
    method = trainer.method
    trainer.model.train()
    batch = trainer.to_device(next(iter(method.batches(1))))
    with counted_host_reads() as reads:
        for _ in range(2):
            method.backward_and_step(method.compute_loss(batch))
    assert reads == []
    assert method._steps == 2 and all(torch.isfinite(p).all() for p in method.metric_params)


def test_hdml_fixed_triplet_layout_is_read_on_the_first_batches_only_off_the_cpu(compose_cfg, tmp_path, monkeypatch):
    import dml_runner.losses.hdml as hdml

    trainer = build_trainer(compose_cfg, tmp_path, *TRIPLET)
    loss, method = trainer.loss, trainer.method
    trainer.model.train()
    batch = trainer.to_device(next(iter(method.batches(1))))
    with counted_host_reads() as reads:
        method.compute_loss(batch)
    assert reads == ["__bool__"]  # the CPU: every batch's layout is read (free there)
    # off the CPU (meta: a device whose values cannot be read) only the first LAYOUT_CHECKS batches are read
    labels = batch[1].to("meta")
    loss._layout_checks = 0
    with pytest.raises(Exception):  # noqa: B017 - a meta tensor's value cannot be read: the check tried
        loss._fixed_triplets(labels)
    loss._layout_checks = hdml.LAYOUT_CHECKS
    a, p, n = loss._fixed_triplets(labels)
    assert a.numel() == p.numel() == n.numel() == labels.numel() // 3


def test_hdml_nan_synthetic_npair_loss_counts_as_zero_with_the_same_gradients(monkeypatch):
    """nan_to_zero: a NaN synthetic N-pair loss is decided on the device; value and gradients are those of the
    official constant 0 (finite: the hook keeps 0 * NaN from inside the loss away from the head)."""
    results = {}
    for case in ("nan", "constant"):
        loss, head_fn, head = toy_hdml("npair", pulling_factor=50.0)
        loss.javg.mean.fill_(1.0)
        loss.jgen_avg.mean.fill_(1.0)
        real = type(loss)._npair_terms

        def terms(self, z, labels, case=case):
            metric, aug, aug_labels, parts, synthetic = real(self, z, labels)

            def broken(z_syn):
                value = synthetic(z_syn)
                return value * torch.log(z_syn.new_zeros(())) * 0.0 if case == "nan" else z_syn.new_zeros(())
            return metric, aug, aug_labels, parts, broken

        monkeypatch.setattr(type(loss), "_npair_terms", terms)
        features, labels = npair_batch()
        out = loss(features, labels, head=head_fn)
        out["loss"].backward()
        results[case] = (float(out["loss"]), [p.grad.clone() for p in head.parameters()])
        monkeypatch.undo()
    assert results["nan"][0] == pytest.approx(results["constant"][0], rel=0, abs=0)
    for got, want in zip(results["nan"][1], results["constant"][1]):
        assert torch.isfinite(got).all() and torch.equal(got, want)


def test_trainer_loop_reads_the_device_only_at_its_check_points(tmp_path):
    """Between NaN-guard reads (every N steps on CUDA) the loop reads nothing; here N is larger than the epoch, so
    the reads are the epoch end's: the guard's step and the mean loss."""
    from test_faults import FailingLoss, make_trainer

    trainer = make_trainer(tmp_path, FailingLoss(10_000, "nan"), epochs=1)
    trainer.finite_check_every = 100
    trainer.model.train()
    with counted_host_reads() as reads:
        loss, _ = trainer._train_epoch(1)
    assert sorted(reads) == ["__float__", "__int__"] and loss > 0
