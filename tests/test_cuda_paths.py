"""The settings and guards of the CUDA paths that the CPU can express: float32 evaluation under a bf16-training
trainer, memory released between in-process runs, the local-rank check, the process group's timeout, backend
determinism flags, TF32 kept off the evaluation's products and the default number of loader workers."""

from __future__ import annotations

import gc
import os
import warnings
from functools import partial

import numpy as np
import pytest
import torch

from dml_runner import DMLRunnerError
from dml_runner.backbones import small_cnn
from dml_runner.config import TrainerConfig
from dml_runner.datasets.base import DatasetSplits, TensorLabelledDataset
from dml_runner.distributed import DistInfo
from dml_runner.methods import StandardMethod
from dml_runner.samplers import ClassBalancedBatchSampler


def _tiny_trainer(tmp_path, eval_amp: bool):
    from dml_runner.losses import TripletLoss
    from dml_runner.training.trainer import Trainer

    gen = torch.Generator().manual_seed(0)
    images, labels = torch.rand(48, 1, 8, 8, generator=gen), np.repeat(np.arange(6), 8)
    data = DatasetSplits(name="tiny", train=TensorLabelledDataset(images[:32], labels[:32]),
                         test=TensorLabelledDataset(images[32:], labels[32:]))
    seen: dict = {}

    def evaluate(emb, labels, **_):
        seen["emb_dtype"] = emb.dtype
        return {"recall@1": 0.0}

    settings = TrainerConfig(device="cpu", epochs=1, batch_size=8, amp=True, progress=False,
                             eval_before_training=False, save_checkpoints=False, save_embeddings=False)
    trainer = Trainer(settings, data, small_cnn(in_channels=1, width=4, embedding_dim=8), TripletLoss(),
                      StandardMethod(), partial(torch.optim.SGD, lr=0.01), None,
                      lambda lab, batch_size=None, seed=None: ClassBalancedBatchSampler(lab, batch_size or 8, 0,
                                                                                        samples_per_class=2),
                      evaluate, tmp_path, eval_amp=eval_amp)
    # the CPU stand-in for the CUDA trainer with trainer.amp=true: its training autocast is bf16
    trainer.use_amp = True
    trainer.autocast = lambda: torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    trainer.model.register_forward_hook(lambda m, i, out: seen.setdefault("model_out", []).append(out.dtype))
    return trainer, seen


@pytest.mark.parametrize("eval_amp,model_dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_evaluation_embeds_in_float32_unless_eval_amp(tmp_path, eval_amp, model_dtype):
    """trainer.amp=true trains under bf16 autocast; evaluation embeds without it (float32, as dml-embed) unless
    eval.amp=true. The hook sees the network's own output dtype, before the cast to float32 for the metrics."""
    trainer, seen = _tiny_trainer(tmp_path, eval_amp)
    with trainer.autocast():  # the stand-in autocast really changes the network's output dtype
        assert trainer.model(torch.rand(2, 1, 8, 8)).dtype == torch.bfloat16
    seen.clear()
    trainer.evaluate_split("test")
    assert set(seen["model_out"]) == {model_dtype}
    assert seen["emb_dtype"] == np.float32


def _live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every tensor the process's Python objects hold (garbage in cycles too)."""
    seen, total = set(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on torch's deprecated aliases warns
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
                try:  # tensors without storage (the fake tensors an earlier torch.compile keeps) hold no memory
                    storage = obj.untyped_storage()
                    storage.data_ptr()
                except RuntimeError:
                    continue
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total


def test_three_in_process_runs_do_not_accumulate_tensors(compose_cfg, tmp_path):
    """A multirun in one process (Hydra's basic launcher, the GPU check's backbones): with the automatic garbage
    collector off, the tensors alive after each run stay at the level of the first (each run holds about 2.2 MB:
    model, optimiser state and data; without the release the level grows by that per run)."""
    from dml_runner.run import run

    cfg = compose_cfg("trainer=smoke", "trainer.device=cpu", "eval.metrics=[recall]",
                      "trainer.eval_before_training=false")
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        levels = []
        for i in range(3):
            run(cfg, tmp_path / f"run{i}")
            levels.append(_live_tensor_bytes())
    finally:
        if was_enabled:
            gc.enable()
    assert levels[2] - levels[0] < 200_000 and levels[1] - levels[0] < 200_000, levels


def test_local_rank_beyond_the_gpus_is_one_line(monkeypatch):
    from dml_runner.distributed import rank_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device(DistInfo(rank=1, world_size=2, local_rank=1), torch.device("cuda")) == torch.device("cuda", 1)
    with pytest.raises(DMLRunnerError, match="local rank 2 but this machine has 2 GPU") as err:
        rank_device(DistInfo(rank=2, world_size=3, local_rank=2), torch.device("cuda"))
    assert "--nproc_per_node=2" in str(err.value) and "\n" not in str(err.value)
    assert rank_device(DistInfo(rank=2, world_size=3, local_rank=2), torch.device("cpu")) == torch.device("cpu")


def test_process_group_gets_the_timeout_option(monkeypatch):
    """trainer.dist_timeout_s reaches init_process_group (NCCL's own default, 10 minutes, kills a job whose rank 0
    evaluates longer); on NCCL the waiting ranks get a gloo group with the same timeout."""
    import datetime

    import torch.distributed as dist

    import dml_runner.distributed as d

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setattr(dist, "new_group", lambda **kw: calls.append(("group", kw)) or "gloo-group")
    monkeypatch.setattr(d, "_WAIT_GROUP", None)
    d.init_distributed(DistInfo(rank=0, world_size=2), torch.device("cuda", 0), timeout_s=5400)
    want = datetime.timedelta(seconds=5400)
    assert calls == [("init", {"backend": "nccl", "timeout": want}), ("group", {"backend": "gloo", "timeout": want})]
    assert d._WAIT_GROUP == "gloo-group"
    calls.clear()
    d.init_distributed(DistInfo(rank=0, world_size=2), torch.device("cpu"))
    assert calls == [("init", {"backend": "gloo", "timeout": datetime.timedelta(seconds=d.DEFAULT_TIMEOUT_S)})]
    assert d._WAIT_GROUP is None
    assert TrainerConfig().dist_timeout_s == d.DEFAULT_TIMEOUT_S >= 3600


def test_timeout_option_is_checked(compose_cfg):
    from dml_runner.config import validate_config

    with pytest.raises(DMLRunnerError, match="trainer.dist_timeout_s"):
        validate_config(compose_cfg("trainer.dist_timeout_s=0"))


@pytest.fixture
def restore_backends():
    state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = state[2], state[3]
    if state[4] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = state[4]


def test_deterministic_sets_cublas_workspace_and_deterministic_algorithms(restore_backends, monkeypatch):
    from dml_runner.devices import CUBLAS_DETERMINISTIC, configure_backends

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    configure_backends(deterministic=True, cuda=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_DETERMINISTIC
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark
    configure_backends(deterministic=False, cuda=True)  # the next run of a multirun: autotuned, not deterministic
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    configure_backends(deterministic=False, cuda=False)
    assert not torch.backends.cudnn.benchmark


def test_run_configures_the_backends_before_building_anything(compose_cfg, tmp_path, monkeypatch):
    import dml_runner.devices as backends

    calls = []
    monkeypatch.setattr(backends, "configure_backends", lambda deterministic, cuda: calls.append((deterministic,
                                                                                                    cuda)))
    monkeypatch.setattr("dml_runner.run.instantiate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    from dml_runner.run import run

    with pytest.raises(RuntimeError, match="stop"):
        run(compose_cfg("trainer=smoke", "trainer.device=cpu", "trainer.deterministic=true"), tmp_path / "r")
    assert calls == [(True, False)]


def test_exact_float32_matmul_turns_tf32_off_and_restores(monkeypatch):
    from dml_runner.devices import exact_float32_matmul

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 allowed, as a user's script may set it
    try:
        with exact_float32_matmul():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_default_loader_workers_from_the_cores(tmp_path, monkeypatch):
    from dml_runner.training.trainer import loader_workers
    from dml_runner.datasets.base import SubsetLabelledDataset
    from dml_runner.datasets.images import ImageListDataset

    files = ImageListDataset([tmp_path / f"{i}.jpg" for i in range(4)], np.array([0, 0, 1, 1]))
    memory = TensorLabelledDataset(torch.zeros(4, 1, 2, 2), np.array([0, 0, 1, 1]))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers(None, files, cuda=True) == 8
    assert loader_workers(None, SubsetLabelledDataset(files, np.array([0, 2])), cuda=True) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four torchrun processes share the 16 cores
    assert loader_workers(None, files, cuda=True) == 3
    assert loader_workers(None, memory, cuda=True) == 0  # in-memory (digits): no workers
    assert loader_workers(None, files, cuda=False) == 0  # CPU training: the cores compute the step
    assert loader_workers(5, memory, cuda=False) == 5  # an explicit trainer.num_workers wins
    assert TrainerConfig().num_workers is None


class _FakeGpuFaiss:
    """Real faiss, except that it claims two GPUs and records which one an index is copied to (the copy stays the
    CPU index, so searches still answer)."""

    def __init__(self, real):
        self._real, self.copies = real, []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def get_num_gpus(self):
        return 2

    class StandardGpuResources:
        pass

    def index_cpu_to_gpu(self, resources, number, index):
        self.copies.append(number)
        return index

    def index_cpu_to_all_gpus(self, *a, **k):
        raise AssertionError("every GPU taken")


@pytest.fixture
def fake_gpu_faiss(monkeypatch):
    import sys

    fake = _FakeGpuFaiss(pytest.importorskip("faiss"))
    monkeypatch.setitem(sys.modules, "faiss", fake)
    return fake


def _retrieval_problem(n_per_class: int, classes: int = 3, dim: int = 4):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), n_per_class)
    x = (rng.normal(size=(labels.size, dim)) + labels[:, None]).astype(np.float32)
    return x, labels


def test_faiss_gpu_search_uses_the_ranks_gpu_and_the_cpu_index_beyond_its_k_limit(fake_gpu_faiss, caplog):
    from dml_runner.evaluation.retrieval import FAISS_GPU_MAX_K, faiss_retrieval

    x, y = _retrieval_problem(20)
    idx = np.arange(y.size)
    on_gpu = faiss_retrieval(x, y, x, y, idx, max_k=4, use_gpu=True, device=torch.device("cuda", 1))
    assert fake_gpu_faiss.copies == [1]  # cuda:1 alone, not every GPU
    plain = faiss_retrieval(x, y, x, y, idx, max_k=4)
    assert np.array_equal(on_gpu.first_rank, plain.first_rank)
    # a class with more gallery items than the GPU search returns: the CPU index, the same answer, logged
    x, y = _retrieval_problem(FAISS_GPU_MAX_K + 2, classes=2, dim=2)
    fake_gpu_faiss.copies.clear()
    with caplog.at_level("INFO"):
        big = faiss_retrieval(x, y, x, y, np.arange(y.size), max_k=1, use_gpu=True, device=torch.device("cuda", 0),
                              need_ranking=True)
    assert fake_gpu_faiss.copies == [] and "at most 2048 neighbours" in caplog.text
    assert big.map_at_r.shape == (y.size,)


def test_faiss_kmeans_takes_the_given_gpu_alone(fake_gpu_faiss):
    from dml_runner.evaluation.kmeans import kmeans

    x, y = _retrieval_problem(30)
    _, a_gpu = kmeans(x, 3, backend="faiss", device=torch.device("cuda", 1), niter=10)
    assert fake_gpu_faiss.copies == [1]
    _, a_cpu = kmeans(x, 3, backend="faiss", device="cpu", niter=10)
    assert fake_gpu_faiss.copies == [1] and np.array_equal(a_gpu, a_cpu)


def test_divide_and_conquer_without_faiss_falls_back_to_torch_kmeans_with_a_message(monkeypatch, caplog):
    import importlib.util

    from dml_runner.methods.divide_conquer import DivideConquerMethod

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "faiss" else real(name, *a))
    with caplog.at_level("WARNING"):
        method = DivideConquerMethod(num_clusters=2, kmeans_backend="faiss")
    assert method.kmeans_backend == "torch"
    assert "faiss is not installed" in caplog.text and "method.kmeans_backend=torch" in caplog.text
    monkeypatch.undo()
    if importlib.util.find_spec("faiss") is not None:
        assert DivideConquerMethod(num_clusters=2).kmeans_backend == "faiss"


def test_cached_feature_batches_are_the_same_rows_pinned_or_not(monkeypatch):
    import dml_runner.methods.feature_cache as fc

    gen = torch.Generator().manual_seed(0)
    features, labels = torch.randn(3, 10, 4, generator=gen), np.arange(10) % 5
    sampler = [[0, 3, 5, 9], [1, 2, 8, 7]]
    pinned = []

    def buffer(shape, dtype, pin):  # the CPU has no page-locked memory: record the request, return plain memory
        pinned.append(pin)
        return torch.empty(shape, dtype=dtype)

    monkeypatch.setattr(fc, "_batch_buffer", buffer)
    for pin in (False, True):
        cache = fc.FeatureCache(features, labels, seed=1, pin_memory=pin)
        batches = cache.batches(sampler, epoch=2)
        for (got, lab), indices in zip(batches, sampler):
            idx = torch.tensor(indices)
            assert torch.equal(got, features[batches.view_of[idx], idx]) and torch.equal(lab, torch.as_tensor(
                labels[indices]))
    assert pinned == [False, False, True, True]
    assert fc.FeatureCache(features, labels).pin_memory == torch.cuda.is_available()


def test_divide_and_conquer_clusters_on_the_training_gpu(monkeypatch):
    """Rank 0's re-clustering runs k-means on the training device when that is CUDA (here a stand-in device)."""
    import types

    import dml_runner.methods.divide_conquer as dc

    seen = {}

    def fake_kmeans(x, k, **kw):
        seen.update(kw)
        return None, np.arange(len(x)) % k

    monkeypatch.setattr(dc, "kmeans", fake_kmeans)
    method = dc.DivideConquerMethod(num_clusters=2, kmeans_backend="torch", cluster_on="embedding")
    monkeypatch.setattr(method, "_build_cluster_sampler", lambda epoch: None)
    monkeypatch.setattr(method, "_cluster_view", lambda: None)
    for device, want in ((torch.device("cuda", 0), torch.device("cuda", 0)), (torch.device("cpu"), "cpu")):
        method.ctx = types.SimpleNamespace(dist=DistInfo(), embed=lambda *a, **k: torch.zeros(6, 3), seed=0,
                                           device=device)
        method.assignments = None
        method.recluster(1)
        assert seen["device"] == want


def test_search_blocks_are_sized_for_the_device(monkeypatch):
    """On CUDA a distance block may take GPU_BLOCK_GB (at most a quarter of the free memory), so a chunk is
    thousands of rows; the host keeps its 0.5 GB."""
    from dml_runner.evaluation.cpu import GPU_BLOCK_GB, HOST_BLOCK_GB, block_budget_gb
    from dml_runner.evaluation.memory import rows_per_chunk

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (80 * 2**30, 80 * 2**30))
    assert block_budget_gb("cpu") == HOST_BLOCK_GB and block_budget_gb("cuda:0") == GPU_BLOCK_GB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (6 * 2**30, 80 * 2**30))
    assert block_budget_gb("cuda:0") == 1.5  # a quarter of 6 GB free
    sop = 60_502  # gallery size of Stanford Online Products
    assert rows_per_chunk(sop, 4096, None, budget_gb=GPU_BLOCK_GB) == 4096
    assert rows_per_chunk(sop, 4096, None, budget_gb=HOST_BLOCK_GB) < 1000
