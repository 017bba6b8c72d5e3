"""Every option of every config group composes, and the ones that need no data instantiate."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class, get_method, instantiate
from omegaconf.errors import ConfigKeyError, ValidationError

from dml_runner.config import conf_dir, group_options

CONF = conf_dir()
GROUPS = ["dataset", "transform", "backbone", "loss", "sampler", "optimizer", "scheduler", "method", "trainer",
          "eval", "paths"]


def options(group: str) -> list[str]:
    return group_options(group)


def all_options():
    return [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize("group,option", all_options())
def test_every_option_composes(compose_cfg, group, option):
    cfg = compose_cfg(f"{group}={option}")
    node = cfg[group]
    target = node.get("_target_") if hasattr(node, "get") else None
    if target:  # the target must exist (class or function)
        try:
            get_class(target)
        except Exception:
            get_method(target)


@pytest.mark.parametrize("option", [o for o in options("loss") if not o.startswith("hdml")])
def test_every_loss_follows_the_contract(compose_cfg, option):
    """(HDML losses need method=hdml's features and head: tests/test_hdml.py covers them.)"""
    cfg = compose_cfg(f"loss={option}")
    loss = instantiate(cfg.loss, _convert_="all")
    assert isinstance(loss, torch.nn.Module)
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(16, 8), dim=1).requires_grad_()
    labels = torch.arange(8).repeat_interleave(2)
    value = loss(emb, labels)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("option", options("backbone"))
def test_every_backbone_builds_an_embedding_model(compose_cfg, option):
    cfg = compose_cfg(f"backbone={option}")
    model = instantiate(cfg.backbone, in_channels=3, _convert_="all").eval()
    size = 16 if option == "small_cnn" else 64
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, cfg.backbone.embedding_dim)
    if cfg.backbone.normalize:
        assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("option", options("sampler"))
def test_every_sampler_yields_batches(compose_cfg, option):
    cfg = compose_cfg(f"sampler={option}")
    labels = np.repeat(np.arange(40), 5)
    # 24 images: a whole number of pairs (npair), triplets (hdml_triplets) and groups of 4 (class_balanced)
    sampler = instantiate(cfg.sampler, labels=labels, batch_size=24, seed=0, _convert_="all")
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0 and all(len(b) == 24 for b in batches)


@pytest.mark.parametrize("opt", options("optimizer"))
@pytest.mark.parametrize("sched", options("scheduler"))
def test_optimizers_and_schedulers_instantiate(compose_cfg, opt, sched):
    cfg = compose_cfg(f"optimizer={opt}", f"scheduler={sched}")
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = instantiate(cfg.optimizer)([{"params": params}])
    assert isinstance(optimizer, torch.optim.Optimizer)
    if cfg.scheduler.get("_target_"):
        instantiate(cfg.scheduler)(optimizer).step()


def test_a_loss_config_can_select_its_method_and_sampler(compose_cfg):
    cfg = compose_cfg("loss=hdml_npair")
    assert cfg.method._target_.endswith("HDMLMethod") and cfg.sampler._target_.endswith("NPairBatchSampler")
    cfg = compose_cfg("loss=hdml_npair", "sampler=class_balanced")  # the command line still wins
    assert cfg.sampler._target_.endswith("ClassBalancedBatchSampler")
    assert compose_cfg("loss=triplet").method._target_.endswith("StandardMethod")


def test_dataset_sampler_presets(compose_cfg):
    # digits has 5 training classes: an N-pair batch (N classes x 2) holds 10 images, whoever picked the sampler
    assert compose_cfg("loss=hdml_npair").trainer.batch_size == 10
    assert compose_cfg("sampler=npair").trainer.batch_size == 10
    assert compose_cfg("sampler=npair", "trainer.batch_size=6").trainer.batch_size == 6
    assert compose_cfg("sampler=npair", "dataset=cub200").trainer.batch_size == 64


def test_default_config_is_the_digits_job(compose_cfg):
    cfg = compose_cfg()
    assert cfg.dataset._target_.endswith("digits.build")
    assert cfg.backbone._target_.endswith("small_cnn")
    assert cfg.trainer.batch_size == 20  # conf/preset/digits.yaml
    assert compose_cfg("trainer.batch_size=40").trainer.batch_size == 40  # command line wins over the preset


@pytest.mark.parametrize("override,error", [
    ("trainer.epoch=3", ConfigKeyError),            # typo of a validated field
    ("trainer.epochs=ten", ValidationError),        # wrong type
    ("eval.recall_at=[one]", ValidationError),
    ("trainer.select_on=tst", ValidationError),     # not a member of config.SelectOn
    ("eval.backend=torch", ValidationError),        # "torch" is not a backend name (auto is)
    ("loss=no_such_loss", ConfigCompositionException),
])
def test_bad_overrides_are_refused(compose_cfg, override, error):
    with pytest.raises((error, ConfigCompositionException)):
        compose_cfg(override)


def test_conf_is_found_from_the_package():
    assert (CONF / "config.yaml").is_file()
    assert Path(CONF).is_absolute()


def test_run_and_sweep_directories_live_under_paths_output_dir():
    from hydra import compose, initialize_config_dir

    from dml_runner.config import register_configs

    register_configs()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["paths.output_dir=/scratch/me"], return_hydra_config=True)
        default = compose("config", return_hydra_config=True)
    assert str(cfg.hydra.run.dir).startswith("/scratch/me/runs/")
    assert str(cfg.hydra.sweep.dir).startswith("/scratch/me/multirun/")
    assert str(default.hydra.run.dir).startswith("outputs/runs/")


def test_the_trainer_settings_object_resolves_interpolations_and_refuses_unknown_keys(compose_cfg):
    from omegaconf import OmegaConf, open_dict

    from dml_runner import DMLRunnerError
    from dml_runner.config import SelectOn, TrainerConfig, trainer_settings

    cfg = compose_cfg("trainer.epochs=7", "trainer.eval_every=${trainer.epochs}", "trainer.select_on=val")
    settings = trainer_settings(cfg)
    assert isinstance(settings, TrainerConfig) and settings.eval_every == 7 and settings.select_on is SelectOn.val
    with open_dict(cfg.trainer):
        cfg.trainer.epoch = 3
    with pytest.raises(DMLRunnerError, match="epoch"):
        trainer_settings(cfg)
    assert OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)["trainer"]["select_on"] == "val"
