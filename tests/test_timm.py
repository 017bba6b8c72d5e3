"""timm backbones (``backbone=timm``): model names, pooled features, freezing, weights through timm's own loader
from an offline Hugging Face hub cache (``tests/hf_cache.py``), and ``transform=timm`` from the pretrained config."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from dml_runner import DMLRunnerError
from dml_runner.backbones import timm_backbone
from dml_runner.backbones.timm_nets import check_model_name, data_config, hf_weights_available, hf_weights_path
from dml_runner.config import trainer_settings, validate_config
from hf_cache import REVISION, offline_hub, write_timm_weights

CNN, VIT = "resnet18.a1_in1k", "vit_tiny_patch16_224.augreg_in21k"  # small models of the two families
DINO = "vit_small_patch16_224.dino"


@pytest.fixture(scope="module")
def hf_hub(tmp_path_factory):
    """A hub cache holding CNN and VIT (random values, timm's names and shapes); HF_HUB_OFFLINE=1 inside."""
    cache = tmp_path_factory.mktemp("hf_hub")
    files = {name: write_timm_weights(cache, name) for name in (CNN, VIT)}
    with offline_hub(cache):
        yield cache, files


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def images(n: int = 2, side: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------ names

@pytest.mark.parametrize("name,match", [
    ("vit_smal_patch16_224.dino", r"backbone.name=vit_smal_patch16_224.dino: not a timm model; close matches: "
                                  r"vit_small_patch16_224.dino"),
    ("vit_small_patch16_224.dinoo", r"no pretrained tag 'dinoo' for vit_small_patch16_224; close matches: "
                                    r"vit_small_patch16_224.dino"),
    ("resnet50.a1_in1kk", r"close matches: resnet50.a1_in1k"),
])
def test_an_unknown_model_is_one_line_naming_the_option_with_close_matches(name, match):
    for build in (check_model_name, timm_backbone):
        with pytest.raises(DMLRunnerError, match=match) as err:
            build(name)
        assert "\n" not in str(err.value)


def test_the_config_check_needs_no_model(compose_cfg):
    """``timm_backbone.check_config``: what dml-run can refuse before it reads data (the name, the option values)."""
    from omegaconf import OmegaConf

    check = timm_backbone.check_config
    node = OmegaConf.to_container(compose_cfg("backbone=timm", f"backbone.name={DINO}").backbone, resolve=True)
    check(node)
    for key, value, match in (("name", "vit_small_patch16_244.dino", "backbone.name=vit_small_patch16_244.dino: not a "
                                                                    "timm model; close matches: "),
                              ("freeze", "bn_some", "backbone.freeze='bn_some'"),
                              ("img_size", 0, "backbone.img_size=0"), ("weights", "/x.safetensors", None)):
        bad = {**node, key: value, **({"pretrained": True} if key == "weights" else {})}
        with pytest.raises(DMLRunnerError, match=match or "not both"):
            check(bad)


def test_known_names_pass_with_or_without_a_tag():
    for name in (DINO, "resnet50.a1_in1k", "resnet50", CNN, VIT):
        check_model_name(name)


# ------------------------------------------------------------------------------------------------ features

def test_features_are_timms_pooled_pre_logits_of_num_features():
    import timm

    torch.manual_seed(0)
    model = timm_backbone(CNN, embedding_dim=24).eval()
    reference = timm.create_model(CNN, num_classes=0).eval()
    reference.load_state_dict(model.trunk.net.state_dict())
    x = images(3, 64)
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True)
        assert torch.allclose(model.features(x), expected, atol=1e-6)
        out = model(x)
    assert model.feature_dim == reference.num_features == 512 and expected.shape == (3, 512)
    assert out.shape == (3, 24) and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert model.info["source"] == "timm" and model.info["feature_dim"] == 512 and model.info["pooling"] == "avg"


def test_a_vit_pools_its_class_token_and_takes_img_size():
    model = timm_backbone(VIT, embedding_dim=8, img_size=32).eval()
    net = model.trunk.net
    assert net.global_pool == "token" and net.pos_embed.shape == (1, 1 + (32 // 16) ** 2, 192)
    with torch.no_grad():
        tokens = net.forward_features(images())
        assert torch.allclose(model.features(images()), tokens[:, 0], atol=1e-6)  # fc_norm is Identity for token
    assert model.feature_dim == 192 and model.info["img_size"] == 32
    with pytest.raises(DMLRunnerError, match="backbone.img_size=0"):
        timm_backbone(VIT, img_size=0)


def test_one_channel_images_are_repeated():
    model = timm_backbone(CNN, embedding_dim=8, in_channels=1).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x.expand(-1, 3, -1, -1)))
    with pytest.raises(DMLRunnerError, match="1- or 3-channel"):
        timm_backbone(CNN, in_channels=4)


# ------------------------------------------------------------------------------------------------ freezing

def sgd_step(model: nn.Module) -> None:
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    emb = model(images(4, 32))
    loss = (emb[0] * emb[1:]).sum() - emb[:, :4].sum()
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("freeze", ["none", "bn", "bn_all", "all"])
def test_freeze_options_mean_what_they_mean_for_torchvision(freeze):
    torch.manual_seed(0)
    model = timm_backbone(CNN, embedding_dim=8, freeze=freeze)
    bn = model.trunk.net.bn1
    conv = model.trunk.net.conv1.weight
    before = {k: v.clone() for k, v in model.trunk.net.state_dict().items()}
    sgd_step(model)
    after = model.trunk.net.state_dict()
    assert model.trunk.training and bn.training == (freeze == "none")
    stats_changed = not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])
    assert stats_changed == (freeze == "none")
    assert (not torch.equal(before["bn1.weight"], after["bn1.weight"])) == (freeze in ("none", "bn"))
    assert (not torch.equal(before["conv1.weight"], after["conv1.weight"])) == (freeze != "all")
    assert conv.requires_grad == (freeze != "all")
    if freeze == "all":
        assert not any(p.requires_grad for p in model.trunk.parameters())
        assert model.head.fc.weight.requires_grad


def test_bn_freezing_is_refused_for_a_model_without_batchnorm():
    with pytest.raises(DMLRunnerError, match="backbone.freeze=bn: .* has no BatchNorm layer; use none or all"):
        timm_backbone(VIT, freeze="bn", img_size=32)
    with pytest.raises(DMLRunnerError, match="backbone.freeze='some'"):
        timm_backbone(CNN, freeze="some")


# ------------------------------------------------------------------------------------------------ weights

def assert_loaded_from(model: nn.Module, path: Path, resampled: tuple[str, ...] = ()) -> None:
    """Every trunk tensor equals the file's (``resampled`` keys: same values count not required); the file's other
    keys are the classifier timm drops for num_classes=0."""
    state = load_file(str(path))
    net = model.trunk.net.state_dict()
    assert net and all(torch.equal(v, state[k]) for k, v in net.items() if k not in resampled)
    assert set(state) - set(net) and all(k.startswith(("fc.", "head.")) for k in set(state) - set(net))


def test_the_cache_has_the_hub_layout(hf_hub):
    cache, files = hf_hub
    for name, path in files.items():
        repo = cache / f"models--timm--{name}"
        assert path == repo / "snapshots" / REVISION / "model.safetensors" and path.is_symlink()
        assert path.resolve().parent == repo / "blobs" and path.resolve().name == sha256(path)
        assert (repo / "refs" / "main").read_text() == REVISION
        assert json.loads((path.parent / "config.json").read_text())["architecture"] == name.split(".")[0]
        assert hf_weights_available(name) and hf_weights_path(name) == path
    assert not hf_weights_available(DINO)


def test_pretrained_weights_load_through_timm_from_the_hub_cache(hf_hub):
    _, files = hf_hub
    model = timm_backbone(CNN, pretrained=True, embedding_dim=8)
    assert_loaded_from(model, files[CNN])
    info = model.info
    assert info["pretrained"] is True and info["weights"] == f"timm:{CNN}"
    assert info["weights_source"] == f"hf-hub:timm/{CNN}" and info["weights_revision"] == REVISION
    assert info["weights_file"] == str(files[CNN]) and sha256(files[CNN]).startswith(info["weights_sha256"])
    assert len(info["weights_sha256"]) >= 12


def test_a_vit_at_another_size_loads_with_resampled_position_embeddings(hf_hub):
    _, files = hf_hub
    model = timm_backbone(VIT, pretrained=True, img_size=32, embedding_dim=8)
    assert_loaded_from(model, files[VIT], resampled=("pos_embed",))
    state = load_file(str(files[VIT]))
    assert state["pos_embed"].shape == (1, 1 + 14 * 14, 192) and model.trunk.net.pos_embed.shape == (1, 5, 192)
    assert torch.equal(model.trunk.net.pos_embed[0, 0], state["pos_embed"][0, 0])  # class token's entry kept


def test_a_local_weights_file_loads_through_timm(hf_hub, tmp_path):
    _, files = hf_hub
    local = tmp_path / "mine.safetensors"
    local.write_bytes(files[CNN].read_bytes())
    model = timm_backbone(CNN, weights=str(local), embedding_dim=8)
    assert_loaded_from(model, local)
    assert model.info["weights_file"] == str(local.resolve()) and model.info["weights_source"] == "file"
    with pytest.raises(DMLRunnerError, match="not both"):
        timm_backbone(CNN, pretrained=True, weights=str(local))
    with pytest.raises(DMLRunnerError, match="no such file"):
        timm_backbone(CNN, weights=str(tmp_path / "missing.safetensors"))
    with pytest.raises(DMLRunnerError, match=f"backbone.weights={tmp_path / 'vit.safetensors'} does not fit"):
        wrong = tmp_path / "vit.safetensors"
        wrong.write_bytes(files[VIT].read_bytes())
        timm_backbone("resnet34.a1_in1k", weights=str(wrong))


def test_a_missing_cache_offline_is_one_clear_line(hf_hub):
    with pytest.raises(DMLRunnerError) as err:
        timm_backbone("resnet34.a1_in1k", pretrained=True)
    message = str(err.value)
    assert "\n" not in message and message.startswith("backbone.pretrained=true: timm's weights of resnet34.a1_in1k")
    assert "models--timm--resnet34.a1_in1k" in message and "backbone.weights=" in message


@pytest.fixture(scope="module")
def dino_hub(tmp_path_factory):
    """A hub cache holding DINO's ViT-S/16 file (88 MB of random values under timm's names and shapes)."""
    cache = tmp_path_factory.mktemp("hf_hub_dino")
    path = write_timm_weights(cache, DINO)
    return cache, path


def test_vit_small_dino_loads_and_embeds_at_224(dino_hub):
    """The modern recipe's backbone: timm's DINO ViT-S/16 from the hub cache, one forward on two 224-px images."""
    cache, path = dino_hub
    with offline_hub(cache):
        model = timm_backbone(DINO, pretrained=True, embedding_dim=384).eval()
    state = load_file(str(path))
    net = model.trunk.net.state_dict()
    assert set(state) == set(net) and all(torch.equal(v, state[k]) for k, v in net.items())  # DINO has no head
    assert model.feature_dim == 384 and model.trunk.net.pos_embed.shape == (1, 197, 384)
    assert model.info["weights"] == f"timm:{DINO}" and sha256(path).startswith(model.info["weights_sha256"])
    with torch.no_grad():
        out = model(images(2, 224))
    assert out.shape == (2, 384) and torch.isfinite(out).all()


@pytest.mark.parametrize("dataset", ["cub200", "cars196", "sop"])
def test_the_modern_recipe_builds_and_trains_a_step(compose_cfg, dino_hub, dataset):
    """conf/experiment/modern: DINO ViT-S/16 from the hub cache, transform=timm, loss=pml ProxyAnchorLoss; one
    optimiser step (at 32 px) moves the ViT, the head and the proxies."""
    import numpy as np

    cfg = compose_cfg(f"+experiment=modern/vit_s16_dino_proxyanchor_{dataset}", "backbone.img_size=32")
    assert cfg.backbone.name == DINO and cfg.loss.name == "ProxyAnchorLoss" and cfg.backbone.embedding_dim == 384
    assert cfg.reference.table == "modern" and cfg.reference.row == f"sph_dino_{dataset}"
    validate_config(cfg)
    settings = trainer_settings(cfg)  # the trainer settings dml-run builds (typed schema)
    assert settings.eval_every == settings.epochs and settings.grad_clip == 3.0 and settings.loss_lr_mult == 100.0
    with offline_hub(dino_hub[0]):
        model = instantiate(cfg.backbone, in_channels=3, _convert_="all")
    test = instantiate(cfg.transform.test, _convert_="all")
    train = instantiate(cfg.transform.train, _convert_="all")
    image = Image.new("RGB", (50, 40), (10, 200, 30))
    assert test(image).shape == train(image).shape == (3, 32, 32)
    classes = np.arange(1, 11)  # class ids as the datasets give them (not 0..C-1)
    loss = instantiate(cfg.loss, train_labels=np.repeat(classes, 3), _convert_="all")
    params = [{"params": model.parameters()}, {"params": loss.parameters(), "lr": cfg.optimizer.lr * 100}]
    opt = instantiate(cfg.optimizer)(params)
    before = [p.detach().clone() for p in (model.trunk.net.blocks[0].attn.qkv.weight, *loss.parameters())]
    model.train()
    value = loss(model(images(6, 32)), torch.tensor([1, 1, 5, 5, 10, 10]))
    opt.zero_grad()
    value.backward()
    opt.step()
    after = [model.trunk.net.blocks[0].attn.qkv.weight, *loss.parameters()]
    assert torch.isfinite(value) and all(not torch.equal(a, b) for a, b in zip(after, before))


# ------------------------------------------------------------------------------------------------ transform

def test_transform_timm_follows_the_pretrained_config(compose_cfg):
    cfg = compose_cfg("backbone=timm", f"backbone.name={VIT}", "transform=timm")
    train = instantiate(cfg.transform.train, _convert_="all")
    test = instantiate(cfg.transform.test, _convert_="all")
    expected = data_config(VIT)
    assert expected["mean"] == (0.5, 0.5, 0.5) and expected["crop_pct"] == 0.9  # timm's config of that model
    rrc = train.transforms[0]
    assert type(rrc).__name__ == "RandomResizedCrop" and rrc.size == (224, 224) and rrc.interpolation.value == "bicubic"
    assert type(train.transforms[1]).__name__ == "RandomHorizontalFlip"
    assert tuple(train.transforms[-1].mean) == (0.5, 0.5, 0.5)
    resize, crop = test.transforms[0], test.transforms[1]
    assert resize.size == int(224 / 0.9) and crop.size == (224, 224)
    image = Image.new("RGB", (300, 260), (255, 0, 0))
    x = test(image)
    assert x.shape == (3, 224, 224) and torch.allclose(x[0], torch.ones(224, 224))  # (1 - 0.5) / 0.5
    assert train(image).shape == (3, 224, 224)
    small = compose_cfg("backbone=timm", f"backbone.name={CNN}", "backbone.img_size=48", "transform=timm")
    assert instantiate(small.transform.test, _convert_="all")(image).shape == (3, 48, 48)
    assert instantiate(small.transform.train, _convert_="all")(image).shape == (3, 48, 48)


def test_transform_timm_without_a_timm_backbone_is_refused(compose_cfg):
    cfg = compose_cfg("transform=timm")  # backbone=small_cnn has no name
    with pytest.raises(Exception, match="transform=timm reads the model from backbone.name"):
        instantiate(cfg.transform.train, _convert_="all")


def test_the_config_group_builds_the_model(compose_cfg):
    cfg = compose_cfg("backbone=timm", f"backbone.name={CNN}", "backbone.embedding_dim=16")
    model = instantiate(cfg.backbone, in_channels=3, _convert_="all").eval()
    assert model.info["arch"] == CNN and model.embedding_dim == 16
    with torch.no_grad():
        assert model(images()).shape == (2, 16)


@pytest.mark.slow
def test_dml_run_trains_a_timm_backbone_with_its_weights_and_transform(hf_hub, tmp_path):
    """The path a user runs: dml-run on an image folder, weights through timm from the offline hub cache, the
    transform from the model's pretrained config; results.json records the weights file and its sha256."""
    from conftest import run_dml
    from dml_runner.datasets.fixtures import make_folder

    cache, files = hf_hub
    root = make_folder(tmp_path, n_classes=6, per_class=4)
    out = tmp_path / "run"
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_HUB_CACHE"] == str(cache)  # reaches dml-run
    run_dml(["dataset=folder", f"dataset.root={root}", "backbone=timm", f"backbone.name={CNN}",
             "backbone.pretrained=true", "backbone.img_size=32", "backbone.embedding_dim=8", "transform=timm",
             "trainer=smoke", "trainer.batch_size=8", "trainer.device=cpu", "trainer.eval_before_training=false",
             "loss=triplet", "eval.backend=torch_fp32", f"hydra.run.dir={out}"], cwd=tmp_path)
    results = json.loads((out / "results.json").read_text())
    model = results["model"]
    assert model["source"] == "timm" and model["arch"] == CNN and model["weights_file"] == str(files[CNN])
    assert sha256(files[CNN]).startswith(model["weights_sha256"]) and model["img_size"] == 32
    assert results["dataset"]["info"]["transform"] == "timm"


@pytest.mark.parametrize("offline", [True, False])
def test_weights_the_hub_cannot_give_fail_before_any_download_attempt(tmp_path, monkeypatch, offline):
    """Guards timm without network spending about a minute on the hub client's retries before failing: with
    HF_HUB_OFFLINE set, or a hub host that refuses connections, the one-line error comes before timm is asked."""
    import timm
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("timm asked to download"))
    with pytest.raises(DMLRunnerError) as err:
        timm_backbone("resnet34.a1_in1k", pretrained=True)
    message = str(err.value)
    assert "\n" not in message and "models--timm--resnet34.a1_in1k" in message
    assert ("HF_HUB_OFFLINE is set" if offline else "no connection to 127.0.0.1") in message
