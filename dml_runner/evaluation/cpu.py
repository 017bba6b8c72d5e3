"""CPU features and the evaluation paths they choose; every choice can be forced (docs/EVALUATION.md, "CPU paths").

Two choices depend on the CPU, both only where the user left them on ``auto``:

- the k-means assignment precision (bf16 or float32), :func:`kmeans_dtype`;
- which exact search the ``torch`` retrieval backend runs on a CPU (the bf16 screen or the float32 search),
  :func:`use_screen`, and the screen's precision, :func:`screen_dtype`.

Both follow one rule: bf16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX on x86, the BF16 extension
on ARM, as the CPU reports it *and* torch / oneDNN are allowed to use it), float32 elsewhere. Precedence, first
match wins: the explicit argument (``kmeans_precision=``, ``backend=``), the per-feature environment variable
(``DML_KMEANS_PRECISION``, ``DML_EVAL_SEARCH``), ``DML_CPU_PATH`` (all features at once), detection. A forced bf16
path runs on any CPU (torch emulates bf16 products where the hardware lacks them: slower, same results).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache

import torch

ENV_CPU_PATH = "DML_CPU_PATH"  # auto | bf16 | fp32
ENV_KMEANS = "DML_KMEANS_PRECISION"  # auto | bf16 | fp32
ENV_SEARCH = "DML_EVAL_SEARCH"  # auto | screened | fp32 | symmetric
ENV_SCREEN = "DML_SCREEN_PRECISION"  # auto | bf16 | fp32
PRECISIONS = ("auto", "bf16", "fp32")
SEARCHES = ("auto", "screened", "fp32", "symmetric")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which it may not use bf16 instructions
_ONEDNN_NO_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
# CPU flags (/proc/cpuinfo spelling) reported by cpu_info(): bf16 products, int8 / int16 dot products
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni", "avx512_vnni",
                  "avx512_fp16", "asimd", "asimddp", "bf16", "i8mm", "sve")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    arch: str
    flags: frozenset[str]  # the REPORTED_FLAGS this CPU has
    torch_capability: str  # torch's kernel ISA (ATEN_CPU_CAPABILITY lowers it)
    onednn_max_isa: str  # ONEDNN_MAX_CPU_ISA, or "" when unset
    native_bf16: bool
    int8_dot: bool  # AVX-VNNI / AVX512-VNNI / AMX-INT8 / ARM dot product (detected, no path uses it yet)

    def summary(self) -> str:
        return (f"{self.model} ({self.arch}); flags: {' '.join(sorted(self.flags)) or 'none detected'}; torch ISA "
                f"{self.torch_capability}{'; ONEDNN_MAX_CPU_ISA=' + self.onednn_max_isa if self.onednn_max_isa else ''}"
                f"; native bf16: {'yes' if self.native_bf16 else 'no'}")


def _proc_cpuinfo() -> tuple[str, set[str]]:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, val = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model", "hardware") and not model:
                    model = val.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    return model, flags


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """What this process may run: CPU flags, lowered by ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA when set."""
    model, flags = _proc_cpuinfo()
    arch = platform.machine().lower()
    try:
        cap = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - very old torch
        cap = "DEFAULT"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    try:
        mkldnn_bf16 = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover
        mkldnn_bf16 = False
    if arch in ("x86_64", "amd64"):
        hw = bool(flags & {"avx512_bf16", "amx_bf16"})
        native = hw and cap.startswith("AVX512") and isa not in _ONEDNN_NO_BF16 and mkldnn_bf16
    elif arch in ("aarch64", "arm64"):
        native = "bf16" in flags and mkldnn_bf16
    else:
        native = False
    return CpuInfo(model=model or platform.processor() or arch, arch=arch,
                   flags=frozenset(f for f in REPORTED_FLAGS if f in flags), torch_capability=cap,
                   onednn_max_isa=isa, native_bf16=native,
                   int8_dot=bool(flags & {"avx_vnni", "avx512_vnni", "amx_int8", "asimddp"}))


def _env(name: str, allowed: tuple[str, ...]) -> str:
    val = os.environ.get(name, "auto").strip().lower() or "auto"
    if val not in allowed:
        raise ValueError(f"environment variable {name}={val!r} is not one of {', '.join(allowed)}; "
                         f"unset it or use one of those")
    return val


def forced_precision(requested: str = "auto", device: torch.device | str = "cpu", variable: str = ENV_KMEANS) -> str:
    """The precision the user forced (argument, the per-feature ``variable``, DML_CPU_PATH on a CPU), or ``auto``."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    per_feature = _env(variable, PRECISIONS)
    if per_feature != "auto" or torch.device(device).type != "cpu":
        return per_feature
    return _env(ENV_CPU_PATH, PRECISIONS)


def _precision(device: torch.device | str, requested: str, variable: str) -> torch.dtype:
    forced = forced_precision(requested, device, variable)
    if forced != "auto":
        return torch.bfloat16 if forced == "bf16" else torch.float32
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_info().native_bf16 else torch.float32


def kmeans_dtype(device: torch.device | str, requested: str = "auto") -> torch.dtype:
    """Assignment precision of k-means: forced, else bf16 on CUDA and on CPUs with native bf16, else float32."""
    return _precision(device, requested, ENV_KMEANS)


def screen_dtype(device: torch.device | str, requested: str = "auto") -> torch.dtype:
    """Product precision of the screened search: forced (DML_SCREEN_PRECISION, DML_CPU_PATH), else bf16 on CUDA and
    on CPUs with native bf16, else float32."""
    return _precision(device, requested, ENV_SCREEN)


def use_screen(device: torch.device | str) -> bool:
    """Whether the ``torch`` retrieval backend runs the screened search (size thresholds apply on top): forced by
    DML_EVAL_SEARCH, else on a CPU whose screen runs in bf16 (native bf16, or forced by DML_SCREEN_PRECISION /
    DML_CPU_PATH), never on CUDA. The float32 screen (same results) measured slower than the float32 search at
    SOP's size on an emulated AVX2-only CPU, so it runs only when asked for (DML_EVAL_SEARCH=screened)."""
    search = forced_search()
    if search != "auto":
        return search == "screened"
    return torch.device(device).type == "cpu" and screen_dtype(device) == torch.bfloat16


def forced_search() -> str:
    """DML_EVAL_SEARCH: ``auto`` (detection decides), ``screened``, ``fp32`` or ``symmetric`` (the leave-one-out
    search whose product blocks serve their rows and columns; masked evaluations run ``fp32`` instead)."""
    return _env(ENV_SEARCH, SEARCHES)


def use_symmetric(device: torch.device | str) -> bool:
    """Whether the ``torch`` backend runs a leave-one-out evaluation as the symmetric search (size thresholds apply
    on top): forced by DML_EVAL_SEARCH, else on a CPU where it would otherwise run the float32 search (no native
    bf16): there the product is the cost, and the symmetric search does half of it."""
    search = forced_search()
    if search != "auto":
        return search == "symmetric"
    return torch.device(device).type == "cpu" and not use_screen(device)


HOST_BLOCK_GB = 0.5  # one distance block in host memory: stays in a CPU's caches and RAM comfortably
GPU_BLOCK_GB = 4.0  # on a GPU: blocks of thousands of rows (each chunk is a few large kernels, not many small ones)


def block_budget_gb(device: torch.device | str) -> float:
    """Memory for one (rows x gallery) distance block of the search: :data:`HOST_BLOCK_GB`, or on CUDA
    :data:`GPU_BLOCK_GB` capped at a quarter of the GPU's free memory."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return HOST_BLOCK_GB
    free, _ = torch.cuda.mem_get_info(dev)
    return max(HOST_BLOCK_GB, min(GPU_BLOCK_GB, 0.25 * free / 2**30))


def describe_paths(device: torch.device | str = "cpu") -> dict[str, str]:
    """The choices the auto settings make in this process (for logs and benchmarks)."""
    info = cpu_info()
    return {"cpu": info.model, "flags": " ".join(sorted(info.flags)), "torch_isa": info.torch_capability,
            "native_bf16": str(info.native_bf16), "kmeans_precision": str(kmeans_dtype(device)).replace("torch.", ""),
            "search": (f"torch_screened ({str(screen_dtype(device)).replace('torch.', '')})" if use_screen(device)
                       else "torch_symmetric (leave-one-out; torch_fp32 with query/gallery masks)"
                       if use_symmetric(device) else "torch_fp32"),
            "threads": str(torch.get_num_threads())}
