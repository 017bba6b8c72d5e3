"""torchvision trunks: feature layers, freezing (BN / whole CNN), weights from a local file or torchvision's enums."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from dml_runner import DMLRunnerError
from dml_runner.backbones import torchvision_backbone

CONF = Path(__file__).resolve().parents[1] / "conf" / "backbone"


def images(n: int = 4, side: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(0))


def train_step(model: nn.Module) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    loss = model(images(side=32)).pow(2).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("arch,layer,dim", [
    ("resnet18", "avgpool", 512), ("resnet18", "pool5", 512), ("resnet18", "layer3", 256),
    ("googlenet", "avgpool", 1024), ("googlenet", "inception4e", 832),
])
def test_feature_dims(arch, layer, dim):
    model = torchvision_backbone(arch, feature_layer=layer, embedding_dim=32)
    model.eval()
    assert model.feature_dim == dim and model.info["feature_dim"] == dim
    assert model.features(images(2)).shape == (2, dim)
    assert model(images(2)).shape == (2, 32)


def test_layer_cut_drops_later_stages():
    full = sum(p.numel() for p in torchvision_backbone("resnet18").trunk.parameters())
    cut = sum(p.numel() for p in torchvision_backbone("resnet18", feature_layer="layer3").trunk.parameters())
    assert cut < full / 2


@pytest.mark.parametrize("bad", [{"feature_layer": "fc"}, {"feature_layer": "maxpool"}, {"freeze": "head"},
                                 {"arch": "vgg16"}])
def test_bad_options(bad):
    with pytest.raises(DMLRunnerError):
        torchvision_backbone(**{"arch": "resnet18", **bad})


def test_freeze_none_updates_bn_statistics():
    model = torchvision_backbone("resnet18", embedding_dim=8)
    before = model.trunk.net.bn1.running_mean.clone()
    train_step(model)
    assert not torch.equal(before, model.trunk.net.bn1.running_mean)


@pytest.mark.parametrize("arch", ["resnet18", "googlenet"])
def test_freeze_bn_keeps_statistics_and_affine(arch):
    model = torchvision_backbone(arch, embedding_dim=8, freeze="bn")
    bns = model.trunk.batch_norms()
    assert bns and all(not p.requires_grad for m in bns for p in m.parameters())
    before = {k: v.clone() for k, v in model.trunk.state_dict().items()}
    train_step(model)
    assert model.training and model.trunk.training and not any(m.training for m in bns)
    after = model.trunk.state_dict()
    bn_keys = {f"net.{n}.{k}" for n, m in model.trunk.net.named_modules() if m in bns
               for k in ("weight", "bias", "running_mean", "running_var")}
    assert all(torch.equal(before[k], after[k]) for k in bn_keys)
    conv_keys = [k for k in before if k.endswith("weight") and k not in bn_keys]
    assert any(not torch.equal(before[k], after[k]) for k in conv_keys), "the convolutions still train"


def test_freeze_all_trains_only_the_head():
    model = torchvision_backbone("resnet18", embedding_dim=8, freeze="all")
    assert not any(p.requires_grad for p in model.trunk.parameters())
    trunk_before = {k: v.clone() for k, v in model.trunk.state_dict().items()}
    head_before = model.head.fc.weight.detach().clone()
    train_step(model)
    assert not model.trunk.net.training
    assert all(torch.equal(v, model.trunk.state_dict()[k]) for k, v in trunk_before.items())
    assert not torch.equal(head_before, model.head.fc.weight)
    assert model.features(images(2)).grad_fn is None


def test_weights_from_a_local_file(tmp_path):
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = torchvision_backbone("resnet18", weights=str(path))
    assert torch.equal(model.trunk.net.conv1.weight, source.conv1.weight)
    assert torch.equal(model.trunk.net.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    wrapped = tmp_path / "wrapped.pth"  # a DataParallel checkpoint {"state_dict": {"module.conv1.weight": ...}}
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, wrapped)
    model = torchvision_backbone("resnet18", weights=str(wrapped))
    assert torch.equal(model.trunk.net.conv1.weight, source.conv1.weight)


def test_local_weights_errors(tmp_path):
    with pytest.raises(DMLRunnerError, match="no such file"):
        torchvision_backbone("resnet18", weights=str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(DMLRunnerError, match="does not fit resnet50"):
        torchvision_backbone("resnet50", weights=str(wrong))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk")
    with pytest.raises(DMLRunnerError, match="not a readable"):
        torchvision_backbone("resnet18", weights=str(junk))
    with pytest.raises(DMLRunnerError, match="not both"):
        torchvision_backbone("resnet18", weights=str(wrong), pretrained=True)


def test_pretrained_uses_the_torchvision_enum(monkeypatch):
    import torchvision.models._api as api

    source = torchvision.models.resnet18(weights=None)
    requested = []

    def fake_download(url, *args, **kwargs):
        requested.append(url)
        return source.state_dict()

    monkeypatch.setattr(api, "load_state_dict_from_url", fake_download)
    model = torchvision_backbone("resnet18", pretrained=True)
    assert requested == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    assert torch.equal(model.trunk.net.conv1.weight, source.conv1.weight)
    assert model.info["pretrained"] is True


def test_pretrained_download_failure_explains_offline_use(monkeypatch):
    import torchvision.models._api as api

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(DMLRunnerError, match="backbone.weights=") as err:
        torchvision_backbone("resnet18", pretrained=True)
    assert torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url in str(err.value)


def test_googlenet_records_its_deviation_from_the_papers(tmp_path):
    model = torchvision_backbone("googlenet")
    assert "Caffe Inception v1" in model.info["note"] and model.info["transform_input"] is False
    path = tmp_path / "googlenet.pth"
    torch.save(model.trunk.net.state_dict(), path)
    loaded = torchvision_backbone("googlenet", weights=str(path))
    assert loaded.info["transform_input"] is True  # torchvision's GoogLeNet weights expect its input rescaling


@pytest.mark.parametrize("name", ["resnet18", "googlenet"])
def test_backbone_configs_instantiate(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    model = instantiate(cfg, in_channels=3, freeze="bn")
    assert model.info["arch"] == name and model.info["freeze"] == "bn"
    assert model(images(2)).shape == (2, cfg.embedding_dim)


@pytest.mark.slow
@pytest.mark.parametrize("name,dim", [("resnet50", 2048), ("resnet101", 2048)])
def test_large_backbone_configs_instantiate(name, dim):
    model = instantiate(OmegaConf.load(CONF / f"{name}.yaml"), in_channels=3)
    assert model.feature_dim == dim


def test_one_channel_inputs_are_repeated():
    model = torchvision_backbone("resnet18", in_channels=1, embedding_dim=8)
    model.eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 8)
