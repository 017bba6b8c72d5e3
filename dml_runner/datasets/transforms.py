"""The papers' image transforms (PIL image -> normalised float tensor), selected with ``transform=<name>``.

- ``caffe_227`` (Song et al. 2016 Lifted Struct; HDML): resize to 256, random 227 crop + horizontal mirror for
  training, centre 227 crop for testing.
- ``rrc_224`` (Sanakoyeu et al. 2019 Divide and Conquer): RandomResizedCrop 224 + flip for training,
  Resize 256 + CenterCrop 224 for testing.

Both normalise with the ImageNet mean/std torchvision's pretrained weights expect.

``resize_mode`` of ``caffe_227``: ``"warp"`` (default) resizes to 256x256 ignoring the aspect ratio, as Caffe
LMDB pipelines built with ``convert_imageset --resize_height=256 --resize_width=256`` do (an assumption about the
papers' preprocessing: their exact resize is not published); ``"shorter"`` resizes the shorter side to 256.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[Any], Any]


def _normalise() -> list[Transform]:
    return [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def caffe_227(train: bool = True, resize: int = 256, crop: int = 227, resize_mode: str = "warp") -> T.Compose:
    """Resize ``resize`` (warped square or shorter side), random ``crop`` + mirror (train) or centre ``crop`` (test)."""
    if resize_mode not in ("warp", "shorter"):
        raise ValueError(f"resize_mode must be 'warp' or 'shorter', got {resize_mode!r}")
    size = (resize, resize) if resize_mode == "warp" else resize
    steps: list[Transform] = [T.Resize(size)]
    steps += [T.RandomCrop(crop), T.RandomHorizontalFlip()] if train else [T.CenterCrop(crop)]
    return T.Compose(steps + _normalise())


def rrc_224(train: bool = True, crop: int = 224, resize: int = 256) -> T.Compose:
    """RandomResizedCrop ``crop`` + flip (train); Resize ``resize`` (shorter side) + CenterCrop ``crop`` (test)."""
    if train:
        steps: list[Transform] = [T.RandomResizedCrop(crop), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(resize), T.CenterCrop(crop)]
    return T.Compose(steps + _normalise())


NAMED: dict[str, Callable[..., T.Compose]] = {"caffe_227": caffe_227, "rrc_224": rrc_224}


def _from_spec(spec: Any, train: bool) -> Transform | None:
    """A transform from a config value: ``None``, a callable, a name in :data:`NAMED`, or ``{_target_: ..., **kw}``."""
    if spec is None or callable(spec):
        return spec
    if isinstance(spec, str):
        if spec not in NAMED:
            raise ValueError(f"unknown transform {spec!r}; choose one of {sorted(NAMED)}")
        return NAMED[spec](train=train)
    if isinstance(spec, Mapping) and "_target_" in spec:
        module, _, attr = str(spec["_target_"]).rpartition(".")
        kwargs = {k: v for k, v in spec.items() if not str(k).startswith("_")}
        return getattr(importlib.import_module(module), attr)(**kwargs)
    raise ValueError(f"cannot build a transform from {spec!r}")


def resolve_transforms(transform: Mapping[str, Any] | str | None,
                       default: str) -> tuple[Transform, Transform, str]:
    """``(train, test, name)`` from the ``transform`` config group; a missing side uses the dataset's ``default``.

    ``transform`` is the selected option of the ``transform`` group (keys ``train``, ``test``, ``name``), a name from
    :data:`NAMED`, or ``None``.
    """
    if transform is None or isinstance(transform, str):
        transform = {"train": transform, "test": transform, "name": transform}
    train = _from_spec(transform.get("train"), train=True)
    test = _from_spec(transform.get("test"), train=False)
    name = transform.get("name") or "custom"
    if train is None and test is None:
        name = f"{default} (dataset default)"
    elif train is None or test is None:
        name = f"{name} + {default} (dataset default for the missing side)"
    train = train if train is not None else NAMED[default](train=True)
    test = test if test is not None else NAMED[default](train=False)
    return train, test, str(name)
