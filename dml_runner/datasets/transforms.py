"""The papers' image transforms (PIL image -> normalised float tensor), selected with ``transform=<name>``.

- ``caffe_227`` (Song et al. 2016 Lifted Struct; HDML): resize to 256, random 227 crop + horizontal mirror for
  training, centre 227 crop for testing.
- ``rrc_224`` (Sanakoyeu et al. 2019 Divide and Conquer): RandomResizedCrop 224 + flip for training,
  Resize 256 + CenterCrop 224 for testing.

Both normalise with the ImageNet mean/std torchvision's pretrained weights expect.

- ``timm`` (for ``backbone=timm``): the preprocessing of the model's pretrained config (timm's
  ``resolve_data_config``: input size, interpolation, mean/std, crop_pct). Training: RandomResizedCrop at the input
  size + horizontal flip; testing: timm's own eval transform (resize to input size / crop_pct, centre crop).

``resize_mode`` of ``caffe_227``:

- ``"content_pad"``: the official Lifted Structure preprocessing (rksltnl/Deep-Metric-Learning-CVPR16,
  ``code/load_cropped_images.m`` with ``config.m``'s ``crop_padding = 15``, ``square_size = 256``, applied to train
  and test images by ``gen_images.m``): crop to the pixels whose grey value is below 250 plus a ``crop_padding``
  margin, resize the longer side to ``resize`` (aspect ratio kept) and pad the shorter side with white to a
  ``resize`` x ``resize`` square (:class:`CropToContent`, :class:`LongerSidePad`). ``conf/transform/lifted_227.yaml``.
- ``"warp"``: resize to 256x256 ignoring the aspect ratio, as Caffe LMDB pipelines built with
  ``convert_imageset --resize_height=256 --resize_width=256`` do (``conf/transform/caffe_227.yaml``, used by HDML).
- ``"shorter"``: resize the shorter side to 256.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[Any], Any]


def _normalise() -> list[Transform]:
    return [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


# MATLAB rgb2gray weights (the official code's grey image), rounded to uint8 as rgb2gray does
RGB2GRAY = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103], dtype=np.float64)


class CropToContent:
    """Crop to the non-white content plus a margin, as ``load_cropped_images.m`` does.

    Content = pixels whose grey value (MATLAB ``rgb2gray``, rounded) is below ``threshold``. The official box runs
    from ``margin`` pixels before the first content pixel to ``margin`` after the last one, and ``imcrop`` with
    ``[xmin ymin width height]`` returns one pixel more than that, so the crop keeps ``margin`` pixels before and
    ``margin + 1`` after the content, clipped to the image. An image without content is returned unchanged (the
    official code has no rule for it).
    """

    def __init__(self, margin: int = 15, threshold: int = 250) -> None:
        if margin < 0:
            raise ValueError(f"transform crop_padding must be >= 0, got {margin}")
        self.margin = int(margin)
        self.threshold = int(threshold)

    def box(self, image: Image.Image) -> tuple[int, int, int, int] | None:
        """``(left, upper, right, lower)`` of the crop (PIL convention, right/lower exclusive), or None."""
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
        grey = np.floor(rgb @ RGB2GRAY + 0.5)
        content = grey < self.threshold
        rows, cols = np.flatnonzero(content.any(axis=1)), np.flatnonzero(content.any(axis=0))
        if rows.size == 0:
            return None
        height, width = content.shape
        m = self.margin
        return (max(0, int(cols[0]) - m), max(0, int(rows[0]) - m),
                min(width, int(cols[-1]) + m + 2), min(height, int(rows[-1]) + m + 2))

    def __call__(self, image: Image.Image) -> Image.Image:
        box = self.box(image)
        return image if box is None else image.crop(box)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(margin={self.margin}, threshold={self.threshold})"


class LongerSidePad:
    """Resize the longer side to ``size`` (aspect ratio kept) and pad with white to ``size`` x ``size``.

    As ``load_cropped_images.m``: ``imresize(img, [size NaN])`` (the other side rounded up, as MATLAB's
    ``imresize`` computes it; bicubic, here PIL's), then ``floor((size - side) / 2)`` white pixels before and the rest
    after; a square image is resized to ``size`` x ``size``.
    """

    def __init__(self, size: int = 256, fill: int = 255) -> None:
        self.size = int(size)
        self.fill = int(fill)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` of the resized image before padding."""
        s = self.size
        if height > width:
            return max(1, math.ceil(s * width / height)), s
        if width > height:
            return s, max(1, math.ceil(s * height / width))
        return s, s

    def __call__(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        w, h = self.output_size(*image.size)
        resized = image.resize((w, h), Image.BICUBIC)
        if (w, h) == (self.size, self.size):
            return resized
        canvas = Image.new("RGB", (self.size, self.size), (self.fill,) * 3)
        canvas.paste(resized, ((self.size - w) // 2, (self.size - h) // 2))
        return canvas

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, fill={self.fill})"


RESIZE_MODES = ("warp", "shorter", "content_pad")


def caffe_227(train: bool = True, resize: int = 256, crop: int = 227, resize_mode: str = "warp",
              crop_padding: int = 15, white_threshold: int = 250) -> T.Compose:
    """Resize ``resize`` (``resize_mode``), random ``crop`` + mirror (train) or centre ``crop`` (test).

    ``crop_padding`` and ``white_threshold`` are used by ``resize_mode="content_pad"`` only.
    """
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"transform resize_mode must be one of {', '.join(RESIZE_MODES)}, got {resize_mode!r}")
    if crop > resize:
        raise ValueError(f"transform crop={crop} must not exceed resize={resize}")
    steps: list[Transform]
    if resize_mode == "content_pad":
        steps = [CropToContent(crop_padding, white_threshold), LongerSidePad(resize)]
    else:
        steps = [T.Resize((resize, resize) if resize_mode == "warp" else resize)]
    steps += [T.RandomCrop(crop), T.RandomHorizontalFlip()] if train else [T.CenterCrop(crop)]
    return T.Compose(steps + _normalise())


def rrc_224(train: bool = True, crop: int = 224, resize: int = 256) -> T.Compose:
    """RandomResizedCrop ``crop`` + flip (train); Resize ``resize`` (shorter side) + CenterCrop ``crop`` (test)."""
    if train:
        steps: list[Transform] = [T.RandomResizedCrop(crop), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(resize), T.CenterCrop(crop)]
    return T.Compose(steps + _normalise())


def timm_transform(train: bool = True, model: str | None = None, img_size: int | None = None,
                   scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5,
                   crop_pct: float | None = None) -> T.Compose:
    """The preprocessing of timm model ``model``'s pretrained config (``backbone.name`` with ``transform=timm``).

    Training: RandomResizedCrop at the model's input size (``scale``, the model's interpolation) + horizontal flip
    (probability ``hflip``); testing: timm's eval transform (resize to ``size / crop_pct``, centre crop). Both
    normalise with the model's mean/std. ``img_size`` (``backbone.img_size``) replaces the input size, ``crop_pct``
    the model's test crop fraction (e.g. 0.875: resize 256, crop 224; 1.0: resize to the crop size).
    """
    from dml_runner import DMLRunnerError
    from dml_runner.backbones.timm_nets import data_config

    if not model:
        raise DMLRunnerError("transform=timm reads the model from backbone.name: use backbone=timm (or set "
                             "transform.train.model and transform.test.model to a timm model name)")
    cfg = data_config(str(model), img_size)
    if crop_pct is not None:
        if not 0 < crop_pct <= 1:
            raise DMLRunnerError(f"transform.test.crop_pct={crop_pct}: a fraction in (0, 1], or null for the model's")
        cfg["crop_pct"] = float(crop_pct)
    size = int(cfg["input_size"][-1])
    if not train:
        from timm.data import create_transform

        return create_transform(**cfg, is_training=False)
    return T.Compose([T.RandomResizedCrop(size, scale=tuple(scale), interpolation=T.InterpolationMode(
                          cfg["interpolation"])),
                      T.RandomHorizontalFlip(hflip), T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])])


NAMED: dict[str, Callable[..., T.Compose]] = {"caffe_227": caffe_227, "rrc_224": rrc_224}


def _from_spec(spec: Any, train: bool) -> Transform | None:
    """A transform from a config value: ``None``, a callable, a name in :data:`NAMED`, or ``{_target_: ..., **kw}``
    (built by Hydra's ``instantiate``, as every other config node)."""
    if spec is None or callable(spec):
        return spec
    if isinstance(spec, str):
        if spec not in NAMED:
            raise ValueError(f"unknown transform {spec!r}; choose one of {sorted(NAMED)}")
        return NAMED[spec](train=train)
    if isinstance(spec, Mapping) and "_target_" in spec:
        from hydra.utils import instantiate

        return instantiate(spec, _convert_="all")
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
