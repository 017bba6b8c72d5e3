"""torchvision trunks: feature layers, freezing (BN / whole CNN), weights from torchvision's enums or a local file.

The pretrained paths run torchvision's real loading code offline, from the ``hub_cache`` fixture (random
ImageNet-shaped weights under torchvision's file names in a temporary ``TORCH_HOME``, ``tests/hub_cache.py``).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from dml_runner import DMLRunnerError
from dml_runner.backbones import hub_weights_available, hub_weights_path, torchvision_backbone
from hub_cache import checkpoint_name, structured_images, weights_enum

CONF = Path(__file__).resolve().parents[1] / "conf" / "backbone"
# Every torchvision option of conf/backbone (small_cnn has no ImageNet weights; timm: tests/test_timm.py).
TORCHVISION_CONFIGS = sorted(p.stem for p in CONF.glob("*.yaml") if "torchvision_backbone" in p.read_text())
FEATURE_DIMS = {"googlenet": 1024, "resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}


def images(n: int = 4, side: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(0))


def train_step(model: nn.Module, side: int = 32) -> None:
    """One SGD step in train mode on a loss that depends on the embeddings' directions (they are unit length)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    emb = model(structured_images(4, side, seed=7))
    loss = (emb[0] * emb[1:]).sum() - (emb[:, : emb.shape[1] // 2]).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def spread(model: nn.Module, side: int = 64) -> tuple[float, float, float]:
    """Eval mode on 8 random structured images: RMS of the pooled features, the smallest pairwise cosine of the
    pooled features and of the embeddings."""
    model.eval()
    x = structured_images(8, side, seed=123)
    with torch.no_grad():
        feats, emb = model.features(x), model(x)

    def min_cos(z: torch.Tensor) -> float:
        z = F.normalize(z.double(), dim=1)
        cos = z @ z.T
        return float(cos[~torch.eye(len(z), dtype=torch.bool)].min())

    return float(feats.double().pow(2).mean().sqrt()), min_cos(feats), min_cos(emb)


def images_kept_apart(model: nn.Module) -> bool:
    """Pooled features at a realistic scale that differ between images (real ImageNet weights give cosines of
    about 0.5-0.9), and embeddings not all the same (some pair below cosine 0.99)."""
    rms, feat_cos, emb_cos = spread(model)
    return 0.05 < rms < 50 and feat_cos < 0.95 and emb_cos < 0.99


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
                                 {"freeze": "affine"},
                                 {"arch": "vgg16"}])
def test_bad_options(bad):
    with pytest.raises(DMLRunnerError):
        torchvision_backbone(**{"arch": "resnet18", **bad})


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


def test_one_channel_inputs_are_repeated():
    model = torchvision_backbone("resnet18", in_channels=1, embedding_dim=8)
    model.eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 8)


# ------------------------------------------------------------------------------ weights from the hub cache


def test_hub_weights_path_follows_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = hub_weights_path("resnet50")
    assert path == tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    assert path.name == Path(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url).name
    assert not hub_weights_available("resnet50")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    assert hub_weights_available("resnet50") and not hub_weights_available("googlenet")
    with pytest.raises(DMLRunnerError, match="backbone.arch"):
        hub_weights_path("vgg16")


def test_hub_cache_has_torchvisions_names_keys_and_shapes(hub_cache):
    for arch in ("googlenet", "resnet18", "resnet34", "resnet50", "resnet101"):
        path = hub_cache / "hub" / "checkpoints" / checkpoint_name(arch)
        assert path == hub_weights_path(arch) and hub_weights_available(arch)
        assert path.name == Path(weights_enum(arch).url).name
    state = torch.load(hub_weights_path("googlenet"), map_location="cpu", weights_only=True)
    reference = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False).state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in reference.items()}
    assert any(k.startswith("aux1.") for k in state) and any(k.startswith("aux2.") for k in state)


def test_googlenet_pretrained_builds_in_a_subprocess(hub_cache):
    """The command that failed with torchvision's aux_logits ValueError; TORCH_HOME reaches subprocesses."""
    code = ("import json; from dml_runner.backbones import torchvision_backbone; "
            "print(json.dumps(torchvision_backbone('googlenet', pretrained=True).info))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["weights"] == "GoogLeNet_Weights.IMAGENET1K_V1" and info["transform_input"] is True
    assert info["weights_file"] == str(hub_cache / "hub" / "checkpoints" / "googlenet-1378be20.pth")
    assert info["feature_dim"] == 1024


def assert_loaded_from(model: nn.Module, path: Path) -> None:
    """Every parameter and buffer of the trunk equals the file's tensor; the file's other keys are the heads that
    the trunk drops (classifier, GoogLeNet's auxiliary classifiers)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = model.trunk.net.state_dict()
    assert net and all(torch.equal(v, state[k]) for k, v in net.items())
    assert all(k.startswith(("fc.", "aux1.", "aux2.")) for k in set(state) - set(net))


@pytest.mark.parametrize("name", TORCHVISION_CONFIGS)
def test_every_backbone_config_loads_pretrained_weights_from_the_hub_cache(compose_cfg, hub_cache, name):
    cfg = compose_cfg(f"backbone={name}", "backbone.pretrained=true")
    model = instantiate(cfg.backbone, in_channels=3, _convert_="all")
    arch = cfg.backbone.arch
    path = hub_cache / "hub" / "checkpoints" / checkpoint_name(arch)
    info = model.info
    assert info["pretrained"] is True and info["weights"] == f"{type(weights_enum(arch)).__name__}.IMAGENET1K_V1"
    assert info["weights_file"] == str(path) and sha256(path).startswith(info["weights_sha256"])
    assert len(info["weights_sha256"]) >= 12
    assert info["weights_match_torchvision"] is False  # random test weights, not torchvision's file
    assert model.feature_dim == FEATURE_DIMS[arch]
    assert_loaded_from(model, path)
    assert images_kept_apart(model), spread(model)
    if arch == "googlenet":
        assert model.trunk.transform_input and model.trunk.net.aux1 is None


@pytest.mark.parametrize("name", TORCHVISION_CONFIGS)
def test_every_backbone_config_loads_a_local_weights_file(compose_cfg, hub_weights_file, name):
    arch = OmegaConf.load(CONF / f"{name}.yaml").arch
    path = hub_weights_file(arch)
    cfg = compose_cfg(f"backbone={name}", f"backbone.weights={path}")
    model = instantiate(cfg.backbone, in_channels=3, _convert_="all")
    info = model.info
    assert info["pretrained"] is False and info["weights"] == info["weights_file"] == str(path.resolve())
    assert sha256(path).startswith(info["weights_sha256"])
    assert_loaded_from(model, path)
    if arch == "googlenet":
        assert model.trunk.transform_input and info["transform_input"] is True


def test_random_init_is_recorded():
    info = torchvision_backbone("resnet18").info
    assert info["weights"] == "random init" and info["weights_file"] is None and info["weights_sha256"] is None


@pytest.mark.parametrize("name", TORCHVISION_CONFIGS)
def test_torchvisions_own_random_init_collapses_the_features(name):
    """The check that the hub cache's weights pass fails with torchvision's init: GoogLeNet's pooled features
    vanish in eval mode (about 1e-11), ResNets' pooled features of different images have cosines above 0.95.

    The init is drawn from a fixed seed. Measured with seeds 0-5 (OMP_NUM_THREADS=1): GoogLeNet's feature RMS is
    3e-12 to 5e-12 (the check wants > 0.05); ResNet-50's and ResNet-101's smallest feature cosines are 0.993 and
    0.9995 or more; ResNet-18's is the closest call, 0.955-0.964 over those seeds (0.9596 at seed 0, 0.0096 above
    the 0.95 threshold, against float differences between CPU types of about 1e-6). Unseeded, the draw depended on
    the tests that ran before it, and one such draw fell below the threshold."""
    torch.manual_seed(0)
    model = torchvision_backbone(OmegaConf.load(CONF / f"{name}.yaml").arch, embedding_dim=128)
    assert not images_kept_apart(model), spread(model)


def test_pretrained_download_failure_is_explained_and_other_errors_are_not_disguised(tmp_path, monkeypatch):
    import torchvision.models._api as api

    def corrupted(url, *args, **kwargs):
        raise RuntimeError('invalid hash value (expected "0676ba61", got "deadbeef")')

    monkeypatch.setattr(api, "load_state_dict_from_url", corrupted)
    with pytest.raises(DMLRunnerError, match="corrupted"):
        torchvision_backbone("resnet50", pretrained=True)
    monkeypatch.undo()
    # A file that is there but does not fit: torchvision's own error, not "could not get the weights".
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    wrong = hub_weights_path("resnet50")
    wrong.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(RuntimeError, match="state_dict") as err:
        torchvision_backbone("resnet50", pretrained=True)
    assert not isinstance(err.value, DMLRunnerError) and "could not get" not in str(err.value)


# ------------------------------------------------------------------------------------------------- freezing


def bn_keys(model: nn.Module) -> tuple[set[str], set[str]]:
    """Trunk state-dict keys of the BatchNorm (affine parameters, running statistics)."""
    affine, stats = set(), set()
    for name, module in model.trunk.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            affine |= {f"{name}.weight", f"{name}.bias"}
            stats |= {f"{name}.running_mean", f"{name}.running_var"}
    return affine, stats


def changed(before: dict, after: dict, keys) -> bool:
    return any((after[k].double() - before[k].double()).abs().max() > 1e-7 for k in keys)


@pytest.mark.parametrize("name,freeze", [("resnet18", "none"), ("resnet18", "bn"), ("resnet18", "bn_all"),
                                         ("resnet18", "all"), ("googlenet", "bn"), ("googlenet", "bn_all")])
def test_freeze_modes(compose_cfg, hub_cache, name, freeze):
    cfg = compose_cfg(f"backbone={name}", "backbone.pretrained=true", f"backbone.freeze={freeze}")
    model = instantiate(cfg.backbone, in_channels=3, _convert_="all")
    assert model.info["freeze"] == freeze
    affine, stats = bn_keys(model)
    params = dict(model.trunk.named_parameters())
    conv = [k for k in params if k not in affine]
    assert affine and stats and conv
    trains_affine, trains_conv = freeze in ("none", "bn"), freeze != "all"
    assert all(params[k].requires_grad == trains_affine for k in affine)
    assert all(params[k].requires_grad == trains_conv for k in conv)
    model.train()
    bn_training = [m.training for m in model.trunk.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(bn_training) if freeze == "none" else not any(bn_training)
    assert model.training and model.head.training
    before = {k: v.detach().clone() for k, v in model.trunk.state_dict().items()}
    head_before = model.head.fc.weight.detach().clone()
    train_step(model)
    after = model.trunk.state_dict()
    assert changed(before, after, stats) == (freeze == "none")
    assert changed(before, after, affine) == trains_affine
    assert changed(before, after, conv) == trains_conv
    assert not torch.equal(head_before, model.head.fc.weight)


def test_googlenet_rescale_keeps_channels_last_and_torchvisions_values():
    """GoogLeNet's input re-scaling: torchvision's own values, and a channels_last batch stays channels_last."""
    from dml_runner.backbones.torchvision_nets import imagenet_rescale

    net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False, transform_input=True)
    x = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(imagenet_rescale(x), net._transform_input(x))
    cl = x.contiguous(memory_format=torch.channels_last)
    out = imagenet_rescale(cl)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert torch.equal(out, net._transform_input(x))
    assert net._transform_input(cl).is_contiguous()  # torchvision's drops the layout: the reason for the rewrite


def test_repeat_channels_keeps_channels_last_off_the_cpu():
    """The repeated 1-channel batch is channels_last on a non-CPU device (meta: layouts without a GPU)."""
    from dml_runner.backbones.frozen import RepeatChannels

    x = torch.empty(2, 1, 5, 4, device="meta").contiguous(memory_format=torch.channels_last)
    out = RepeatChannels()(x)
    assert out.shape == (2, 3, 5, 4) and out.is_contiguous(memory_format=torch.channels_last)
    cpu = torch.arange(40.0).reshape(2, 1, 5, 4)
    assert torch.equal(RepeatChannels()(cpu), cpu.expand(-1, 3, -1, -1))  # the CPU path as before
