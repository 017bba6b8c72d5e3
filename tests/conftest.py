"""Shared test helpers: compose real configs with Hydra's compose API."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HYDRA_FULL_ERROR", "0")
# Tests use tiny models, for which one intra-op thread is fastest; on a busy 2-core machine two OpenMP threads per
# process made small steps ~30x slower. Set before torch is imported; subprocesses (dml-run) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # test helper modules (fixtures, oracles)


# every test starts from this seed; DML_TEST_SEED=N runs the suite from another one
TEST_SEED = int(os.environ.get("DML_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def seeded_rngs():
    """Every test starts from the same state of Python's, numpy's and torch's global generators, so what a test
    draws without its own seed does not depend on which tests ran before it in this process."""
    import random

    import numpy as np

    random.seed(TEST_SEED)
    np.random.seed(TEST_SEED)
    if "torch" in sys.modules:  # tests that never import torch don't pay for it
        sys.modules["torch"].manual_seed(TEST_SEED)
    yield


@pytest.fixture
def compose_cfg():
    """compose_cfg(*overrides) -> DictConfig composed from the real conf/ tree."""
    from hydra import compose, initialize_config_dir

    from dml_runner.config import conf_dir, register_configs

    register_configs()

    def _compose(*overrides: str):
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            return compose("config", overrides=list(overrides), return_hydra_config=False)

    return _compose


def dml_run_cmd() -> list[str]:
    """The installed console script, next to the interpreter running the tests."""
    script = Path(sys.executable).with_name("dml-run")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dml_runner"]


def run_dml(args: list[str], cwd, check: bool = True, timeout: int = 900):
    """Run the installed dml-run with ``args`` in ``cwd``; with ``check``, a failure shows its output."""
    import subprocess

    proc = subprocess.run(dml_run_cmd() + args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"dml-run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def dml_eval_cmd() -> list[str]:
    script = Path(sys.executable).with_name("dml-eval")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dml_runner.cli.eval"]


@pytest.fixture(scope="session")
def hub_cache(request, tmp_path_factory):
    """TORCH_HOME holding random ImageNet-shaped weights for every torchvision arch (``tests/hub_cache.py``).

    Built once (kept across sessions in pytest's cache directory, keyed by the torchvision version). Sets
    ``os.environ["TORCH_HOME"]`` for the rest of the session, so ``backbone.pretrained=true`` in this process and in
    subprocesses (dml-run) loads these files through torchvision's own code; the old value is restored at the end.
    Returns the TORCH_HOME path; the files are ``<it>/hub/checkpoints/<torchvision's file name>``.
    """
    import torchvision

    from hub_cache import ARCHS, BUILDER_VERSION, build_hub_cache

    key = f"hub-cache-torchvision-{torchvision.__version__}-v{BUILDER_VERSION}".replace("+", "_")
    try:
        torch_home = Path(request.config.cache.mkdir(key))
    except (AttributeError, OSError):  # cache provider disabled (-p no:cacheprovider) or read-only checkout
        torch_home = tmp_path_factory.mktemp("torch_home")
    build_hub_cache(torch_home, ARCHS)
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(torch_home)
    yield torch_home
    if old is None:
        os.environ.pop("TORCH_HOME", None)
    else:
        os.environ["TORCH_HOME"] = old


@pytest.fixture(scope="session")
def hub_weights_file(hub_cache, tmp_path_factory):
    """hub_weights_file(arch) -> a local copy of the hub cache's file for ``backbone.weights=/path.pth``."""
    import shutil

    from hub_cache import checkpoint_name

    folder = tmp_path_factory.mktemp("local_weights")

    def _file(arch: str) -> Path:
        target = folder / f"{arch}-local.pth"
        if not target.exists():
            shutil.copyfile(hub_cache / "hub" / "checkpoints" / checkpoint_name(arch), target)
        return target

    return _file


@pytest.fixture(scope="session")
def smoke_base(request, tmp_path_factory, hub_cache) -> Path:
    """Where the reproduce --smoke runs go; starts every target the selected tests need, two at a time, once per
    session (tests/smoke_runs.py). Used by test_real_path.py and test_reproduce_smoke.py."""
    from smoke_runs import needed_targets, prefetch

    base = tmp_path_factory.getbasetemp() / "reproduce_smoke"
    base.mkdir(exist_ok=True)
    prefetch(needed_targets(request.session.items), base)
    return base
