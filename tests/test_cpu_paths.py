"""Every CPU-feature-chosen path of the evaluation engine can be forced, and each gives the same results on any
CPU: the forcing rules (argument > per-feature variable > DML_CPU_PATH > detection), the auto backend following
them, and an emulated AVX2-only CPU (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA) in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dml_runner.evaluation as ev
import dml_runner.evaluation.kmeans as km
from dml_runner.evaluation import cpu
from test_metrics import KS, RETRIEVAL, _check, brute_retrieval

ENV_VARS = (cpu.ENV_CPU_PATH, cpu.ENV_KMEANS, cpu.ENV_SEARCH, cpu.ENV_SCREEN)


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_detection_reports_the_cpu_and_a_consistent_choice(clean_env):
    info = cpu.cpu_info()
    assert info.model and info.torch_capability
    if info.native_bf16:
        assert info.flags & {"avx512_bf16", "amx_bf16", "bf16"}
    want = torch.bfloat16 if info.native_bf16 else torch.float32
    assert cpu.kmeans_dtype("cpu") == want and cpu.screen_dtype("cpu") == want
    assert cpu.use_screen("cpu") == info.native_bf16  # the bf16 screen only (size thresholds apply in evaluate)
    assert cpu.kmeans_dtype("cuda") == torch.bfloat16 and not cpu.use_screen("cuda")  # no GPU needed
    paths = cpu.describe_paths("cpu")
    assert paths["search"].startswith("torch_screened (bfloat16)" if info.native_bf16 else "torch_symmetric")
    assert cpu.use_symmetric("cpu") != info.native_bf16 and not cpu.use_symmetric("cuda")
    assert "native bf16" in info.summary()


@pytest.mark.parametrize("path, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_dml_cpu_path_forces_every_feature(clean_env, path, dtype):
    clean_env.setenv(cpu.ENV_CPU_PATH, path)
    assert cpu.kmeans_dtype("cpu") == dtype and cpu.screen_dtype("cpu") == dtype
    assert cpu.use_screen("cpu") == (path == "bf16")
    assert cpu.kmeans_dtype("cuda") == torch.bfloat16 == cpu.screen_dtype("cuda")  # a CPU setting only


def test_precedence_argument_then_feature_variable_then_cpu_path(clean_env):
    clean_env.setenv(cpu.ENV_CPU_PATH, "bf16")
    clean_env.setenv(cpu.ENV_KMEANS, "fp32")
    clean_env.setenv(cpu.ENV_SCREEN, "fp32")
    clean_env.setenv(cpu.ENV_SEARCH, "fp32")
    assert cpu.kmeans_dtype("cpu") == torch.float32 == cpu.screen_dtype("cpu") and not cpu.use_screen("cpu")
    assert cpu.kmeans_dtype("cpu", "bf16") == torch.bfloat16  # the explicit argument wins
    clean_env.setenv(cpu.ENV_SEARCH, "screened")
    clean_env.setenv(cpu.ENV_SCREEN, "bf16")
    assert cpu.use_screen("cuda") and cpu.screen_dtype("cuda") == torch.bfloat16  # per-feature: any device


@pytest.mark.parametrize("name", ENV_VARS)
def test_a_bad_value_names_the_variable(clean_env, name):
    clean_env.setenv(name, "fast")
    with pytest.raises(ValueError, match=name):
        cpu.kmeans_dtype("cpu") if name != cpu.ENV_SEARCH else cpu.use_screen("cpu")
        cpu.screen_dtype("cpu")


@pytest.mark.parametrize("search, precision", [("screened", "bf16"), ("screened", "fp32"), ("fp32", "auto")])
def test_auto_backend_follows_the_forced_search(clean_env, search, precision):
    """Every search runs on this CPU whatever it is, and gives the float64 brute-force numbers."""
    x = np.random.default_rng(0).normal(size=(300, 12)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 30, 300)
    clean_env.setenv(cpu.ENV_SEARCH, search)
    clean_env.setenv(cpu.ENV_SCREEN, precision)
    clean_env.setattr(ev, "SCREEN_MIN_QUERIES", 1)
    clean_env.setattr(ev, "SCREEN_MIN_GALLERY", 1)
    clean_env.setattr(ev, "SCREEN_FP32_MIN", 1)
    called = []
    for name in ("exact_retrieval", "screened_retrieval"):
        real = getattr(ev, name)
        clean_env.setattr(ev, name, lambda *a, _r=real, _n=name, **k: called.append((_n, k.get("dtype"))) or
                          _r(*a, **k))
    _check(ev.evaluate(x, y, recall_at=KS, metrics=RETRIEVAL, device="cpu"), brute_retrieval(x, y))
    if search == "screened":
        assert called == [("screened_retrieval", torch.bfloat16 if precision == "bf16" else torch.float32)]
    else:
        assert called == [("exact_retrieval", None)]


def test_the_float32_screen_waits_for_larger_sizes(clean_env):
    """The float32 screen, asked for, only from SCREEN_FP32_MIN queries and gallery items (and never unasked)."""
    clean_env.setenv(cpu.ENV_SCREEN, "fp32")
    assert not cpu.use_screen("cpu")
    clean_env.setenv(cpu.ENV_SEARCH, "screened")
    x = np.random.default_rng(0).normal(size=(300, 12)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 30, 300)
    clean_env.setattr(ev, "SCREEN_MIN_QUERIES", 1)
    clean_env.setattr(ev, "SCREEN_MIN_GALLERY", 1)
    called = []
    real = ev.screened_retrieval
    clean_env.setattr(ev, "screened_retrieval", lambda *a, **k: called.append(1) or real(*a, **k))
    ev.evaluate(x, y, recall_at=KS, metrics=RETRIEVAL, device="cpu")
    assert not called
    clean_env.setattr(ev, "SCREEN_FP32_MIN", 300)
    ev.evaluate(x, y, recall_at=KS, metrics=RETRIEVAL, device="cpu")
    assert called


@pytest.mark.parametrize("path", ["bf16", "fp32"])
def test_kmeans_precision_follows_the_forced_path(clean_env, path):
    clean_env.setenv(cpu.ENV_CPU_PATH, path)
    seen = []
    real_assign = km._assign
    clean_env.setattr(km, "_assign", lambda xa, c, dtype, chunk: seen.append(dtype) or real_assign(xa, c, dtype, chunk))
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(6), 30)
    x = (rng.normal(size=(6, 8))[y] * 10 + rng.normal(size=(180, 8))).astype(np.float32)
    r = ev.evaluate(x, y, metrics=("nmi",), device="cpu")
    assert set(seen) == {torch.bfloat16 if path == "bf16" else torch.float32} and r["nmi"] > 0.99


AVX2_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from dml_runner.evaluation import cpu_info, describe_paths, evaluate
from test_metrics import KS, RETRIEVAL, brute_retrieval
rng = np.random.default_rng(3)
y = np.repeat(np.arange(12), 25)
x = (rng.normal(size=(12, 16))[y] * 10 + rng.normal(size=(300, 16))).astype(np.float32)
out = {"native_bf16": cpu_info().native_bf16, "paths": describe_paths("cpu"),
       "nmi": {p: evaluate(x, y, metrics=("nmi",), device="cpu", kmeans_precision=p)["nmi"] for p in ("bf16", "fp32")}}
xr = rng.normal(size=(400, 10)).astype(np.float32)
yr = rng.integers(0, 40, 400)
want = brute_retrieval(xr, yr)
import os
ok = {}
for b, p in (("torch_screened", "bf16"), ("torch_screened", "fp32"), ("torch_fp32", "auto"),
             ("torch_symmetric", "auto")):
    os.environ["DML_SCREEN_PRECISION"] = p
    got = evaluate(xr, yr, recall_at=KS, metrics=RETRIEVAL, device="cpu", backend=b)
    ok[b + "_" + p] = all(abs(got[k] - v) < 1e-9 for k, v in want.items())
out["retrieval_ok"] = ok
print(json.dumps(out))
"""


@pytest.mark.slow  # a fresh interpreter importing torch, sklearn and faiss: 5 s on a quiet machine, 40 s+ on a busy one
def test_an_avx2_only_cpu_emulated_runs_every_path():
    """torch, oneDNN, MKL and OpenBLAS capped at AVX2 (as on an AMD EPYC without AVX-512): detection says float32
    paths, and the
    bf16 paths, forced, still give exact retrieval and recover well-separated clusters."""
    if cpu.cpu_info().arch not in ("x86_64", "amd64") or "avx2" not in cpu.cpu_info().flags:
        pytest.skip("emulating AVX2 needs an x86 CPU with AVX2")
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2",
               OPENBLAS_CORETYPE="Haswell", OMP_NUM_THREADS="1")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", AVX2_SCRIPT, tests_dir], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["native_bf16"] is False and out["paths"]["torch_isa"] == "AVX2"
    assert out["paths"]["kmeans_precision"] == "float32" and out["paths"]["search"].startswith("torch_symmetric")
    assert min(out["nmi"].values()) > 0.99, out["nmi"]
    assert all(out["retrieval_ok"].values()), out["retrieval_ok"]
