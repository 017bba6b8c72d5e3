"""Checks before work is spent: a bad option is refused with one line naming it, before data or training."""

from __future__ import annotations

import pytest

from conftest import run_dml
from dml_runner import DMLRunnerError


@pytest.mark.parametrize("overrides,words", [
    (["trainer.eval_every=0"], ["trainer.eval_every=0", ">= 1"]),
    (["trainer.epochs=0"], ["trainer.epochs=0"]),
    (["eval.recall_at=[0]"], ["eval.recall_at=[0]", ">= 1"]),
    (["eval.recall_at=[]"], ["eval.recall_at"]),
    (["eval.metrics=[recal]"], ["eval.metrics"]),
    (["optimizer.lr=-1"], ["optimizer.lr=-1", "> 0"]),
    (["optimizer=sgd", "optimizer.momentum=1.5"], ["optimizer.momentum=1.5"]),
    (["+trainer.epoch=1"], ["trainer.epoch", "did you mean epochs"]),
    (["+eval.recal_at=[1]"], ["eval.recal_at", "did you mean recall_at"]),
    (["+epochs=3"], ["epochs", "not a config group or option"]),
    (["+optimizer.lrr=0.1"], ["optimizer.lrr", "torch.optim.Adam", "did you mean lr"]),
    (["+loss.marginn=0.1"], ["loss.marginn", "did you mean margin"]),
    (["transform=rrc_224", "+transform.train.crp=3"], ["transform.train.crp", "did you mean crop"]),
    (["trainer.device=gpu"], ["trainer.device=gpu", "auto, cpu, cuda, cuda:N or mps"]),
    (["eval.device=tpu"], ["eval.device=tpu"]),
    (["scheduler=cosine", "scheduler.T_max=0"], ["scheduler.T_max=0"]),
    (["sampler.samples_per_class=3"], ["trainer.batch_size=20", "sampler.samples_per_class=3"]),
    (["sampler.samples_per_class=0"], ["sampler.samples_per_class=0", ">= 1"]),
    (["method=divide_conquer", "method.recluster_every=0"], ["method.recluster_every=0", ">= 1"]),
    (["method=divide_conquer", "method.num_clusters=4", "trainer.epochs=3"],  # digits conquers the last 3
     ["method.finetune_epochs=3 >= trainer.epochs=3", "never divide"]),
])
def test_bad_options_are_refused_before_anything_is_written(compose_cfg, tmp_path, overrides, words):
    from dml_runner.run import run

    with pytest.raises(DMLRunnerError) as err:
        run(compose_cfg(*overrides), tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    assert not (tmp_path / "run").exists()


def test_divide_conquer_with_room_to_divide_and_one_learner_are_accepted(compose_cfg):
    from dml_runner.config import validate_config

    validate_config(compose_cfg("method=divide_conquer", "method.num_clusters=4", "trainer.epochs=11"))
    validate_config(compose_cfg("method=divide_conquer", "method.num_clusters=1", "trainer.epochs=5"))


def test_sampler_and_method_checks_are_hooks_of_their_targets():
    """The class-balanced sampler and Divide & Conquer check their own config nodes (with the whole config); the
    N-pair sampler inherits the sampler's hook, which has nothing to check in its node."""
    from dml_runner.methods.divide_conquer import DivideConquerMethod
    from dml_runner.samplers.class_balanced import ClassBalancedBatchSampler
    from dml_runner.samplers.npair import NPairBatchSampler

    config = {"trainer": {"batch_size": 20, "epochs": 3}}
    with pytest.raises(DMLRunnerError, match="trainer.batch_size=20 must be a multiple of sampler.samples_per_class=3"):
        ClassBalancedBatchSampler.check_config({"samples_per_class": 3}, config)
    ClassBalancedBatchSampler.check_config({"samples_per_class": 4}, config)
    NPairBatchSampler.check_config({}, config)
    with pytest.raises(DMLRunnerError, match="never divide"):
        DivideConquerMethod.check_config({"num_clusters": 4, "finetune_epochs": 3}, config)
    DivideConquerMethod.check_config({"num_clusters": 1, "finetune_epochs": 3}, config)


def test_the_command_line_error_is_one_line_and_no_epoch_is_trained(tmp_path):
    out = tmp_path / "r"
    proc = run_dml(["trainer.eval_every=0", f"hydra.run.dir={out}"], cwd=tmp_path, check=False)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["dml-run: error: trainer.eval_every=0: must be an integer >= 1"], proc.stderr
    assert not (out / "last.pt").exists() and not (out / "history.csv").exists()


@pytest.mark.slow
def test_every_experiment_and_group_option_passes_the_checks():
    """The checks refuse typos, not the shipped configs (paper rows set many keys of every group)."""
    from hydra import compose, initialize_config_dir

    from dml_runner.config import conf_dir, group_options, register_configs, validate_config

    register_configs()
    conf = conf_dir()
    overrides = [[f"+experiment={row}"] for row in group_options("experiment")]
    for group in ("dataset", "backbone", "loss", "sampler", "optimizer", "scheduler", "method", "logger"):
        overrides += [[f"{group}={option}"] for option in group_options(group)]
    # a transform is read by the datasets of image files (digits prepares its own tensors and refuses one)
    overrides += [["dataset=cub200", f"transform={option}"] for option in group_options("transform")]
    assert len(overrides) > 60
    with initialize_config_dir(str(conf), version_base="1.3"):
        for override in overrides:
            validate_config(compose("config", overrides=override))


def test_a_sweep_is_checked_job_by_job_before_any_job_starts(tmp_path):
    """`-m method=divide_conquer method.num_clusters=1,2,4` with too few epochs: every K>1 would train plain."""
    sweep = tmp_path / "sweep"
    proc = run_dml(["-m", "method=divide_conquer", "method.num_clusters=1,2,4", "trainer.epochs=3",
                    f"hydra.sweep.dir={sweep}"], cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "2 sweep job(s) would fail their config checks; no job was started" in proc.stderr
    assert "job 1 (method=divide_conquer method.num_clusters=2 trainer.epochs=3): method.finetune_epochs=3" \
        in proc.stderr
    assert not list(tmp_path.glob("sweep/*/results.json"))


def test_a_choice_outside_its_enum_is_refused_even_without_the_schema():
    """validate_config checks Enum fields itself, for configs not composed through the structured schema."""
    from omegaconf import OmegaConf

    from dml_runner.config import validate_config

    tree = {"trainer": {"select_on": "tst"}, "eval": {"backend": "torch"}}
    with pytest.raises(DMLRunnerError, match=r"trainer.select_on=tst: use one of auto, val, final, test"):
        validate_config(OmegaConf.create(tree))


def test_a_target_may_check_its_own_config_node_before_any_work(compose_cfg, monkeypatch):
    """validate_config calls `<_target_>.check_config(node)` where the target defines one."""
    from dml_runner.config import validate_config
    from dml_runner.losses.triplet import TripletLoss

    seen = []

    def check_config(node):
        seen.append(node["margin"])
        if node["margin"] > 1:
            raise DMLRunnerError(f"loss.margin={node['margin']}: too large for this test")

    monkeypatch.setattr(TripletLoss, "check_config", staticmethod(check_config), raising=False)
    validate_config(compose_cfg("loss=triplet", "loss.margin=0.5"))
    with pytest.raises(DMLRunnerError, match="loss.margin=2.0: too large"):
        validate_config(compose_cfg("loss=triplet", "loss.margin=2.0"))
    assert seen == [0.5, 2.0]


def test_one_device_rule_names_the_option(monkeypatch):
    """dml_runner.devices.resolve_device serves trainer.device, eval.device and dml-eval --device alike."""
    import torch

    from dml_runner.devices import DeviceError, resolve_device

    assert resolve_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    for name, option, words in (("gpu", "eval.device", "eval.device=gpu: not a device"),
                                ("cuda:1", "trainer.device", "trainer.device=cuda:1: PyTorch sees no CUDA device")):
        with pytest.raises(DeviceError, match=words) as err:
            resolve_device(name, option)
        assert isinstance(err.value, ValueError) and isinstance(err.value, DMLRunnerError)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match=r"cuda:1: PyTorch sees 1 CUDA device\(s\)"):
        resolve_device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
