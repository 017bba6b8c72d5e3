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
- ``"warp"``: resize to 256x256 ignoring the aspect ratio with PIL's antialiased bilinear filter, as Caffe LMDB
  pipelines built with ``convert_imageset --resize_height=256 --resize_width=256`` roughly do
  (``conf/transform/caffe_227.yaml``'s default).
- ``"warp_cv2"``: resize to 256x256 ignoring the aspect ratio as the HDML code's ``cv2.resize(img, (256, 256))``:
  bilinear without antialiasing (:func:`cv2_linear_resize`); the HDML paper rows use it.
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


_CV2_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS: 8-bit linear resizing weights in 1/2048 units


def _cv2_linear_taps(src: int, dst: int, clamp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices ``(i0, i1)`` and their integer weights ``(w0, w1)`` (1/2048 units) for ``dst`` outputs.

    The sampling position of output ``x`` is ``(x + 0.5) * scale - 0.5`` (pixel centres at half-integers),
    ``scale = 1 / (dst / src)`` in double precision, then rounded to single precision; each weight is rounded to
    1/2048 on its own (to nearest, ties to even). ``clamp`` (OpenCV's horizontal axis): a position left of the first
    or right of the last pixel takes that border pixel with the whole weight. Otherwise (the vertical axis) the
    weights stay as computed and the row indices are clipped to the image, so a border row is split between two
    copies of itself.
    """
    scale = 1.0 / (dst / src)
    pos = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    base = np.floor(pos)
    frac = (pos - base).astype(np.float32)
    i0 = base.astype(np.int64)
    if clamp:
        outside = (i0 < 0) | (i0 >= src - 1)
        frac = np.where(outside, np.float32(0), frac)
        i0 = np.clip(i0, 0, src - 1)
    one = np.float32(1 << _CV2_COEF_BITS)
    w0 = np.rint((np.float32(1) - frac) * one).astype(np.int64)
    w1 = np.rint(frac * one).astype(np.int64)
    return np.clip(i0, 0, src - 1), np.clip(i0 + 1, 0, src - 1), w0, w1


def cv2_linear_resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """OpenCV's ``cv2.resize(image, (width, height))`` (``INTER_LINEAR``) of an 8-bit (H, W) or (H, W, C) array.

    Bilinear interpolation between the two nearest source pixels per axis, without antialiasing (a downscale
    skips pixels rather than averaging them), in OpenCV's 8-bit fixed-point arithmetic: the horizontal pass sums
    ``pixel x weight`` exactly (weights in 1/2048); the vertical pass (OpenCV's vectorised one, which covers every row
    whose length W x C is a multiple of the vector width, e.g. 256 x 3) shifts each row sum right by 4, keeps the
    high 16 bits of its product with the row weight, adds the two, and rounds off the last 2 bits. Like OpenCV, an
    image of the target size is returned as is, and an exact 2x downscale in both axes averages each 2x2 block
    (OpenCV switches to its area mode there).
    """
    src = np.asarray(image)
    if src.dtype != np.uint8 or src.ndim not in (2, 3):
        raise ValueError(f"cv2_linear_resize takes an 8-bit (H, W) or (H, W, C) array, got {src.dtype} {src.shape}")
    h, w = src.shape[:2]
    if (w, h) == (width, height):
        return src.copy()
    if (w, h) == (2 * width, 2 * height):
        blocks = src.astype(np.int64).reshape(height, 2, width, 2, *src.shape[2:]).sum(axis=(1, 3))
        return ((blocks + 2) >> 2).astype(np.uint8)
    x0, x1, a0, a1 = _cv2_linear_taps(w, width, clamp=True)
    y0, y1, b0, b1 = _cv2_linear_taps(h, height, clamp=False)
    # int32 holds every intermediate: 255 x 2048 per row sum, then 2048 x (row sum >> 4) per product
    a0, a1, b0, b1 = (v.astype(np.int32) for v in (a0, a1, b0, b1))
    used = np.unique(np.concatenate([y0, y1]))  # the horizontal pass only for the source rows the output reads
    pixels = src[used].astype(np.int32)
    y0, y1 = np.searchsorted(used, y0), np.searchsorted(used, y1)
    shape = (1, -1) + (1,) * (src.ndim - 2)
    rows = (a0.reshape(shape) * pixels[:, x0] + a1.reshape(shape) * pixels[:, x1]) >> 4
    shape = (-1,) + (1,) * (src.ndim - 1)
    total = ((b0.reshape(shape) * rows[y0]) >> 16) + ((b1.reshape(shape) * rows[y1]) >> 16)
    return np.clip((total + 2) >> 2, 0, 255).astype(np.uint8)


class Cv2LinearResize:
    """Resize a PIL image to ``size`` x ``size`` (aspect ratio ignored) as ``cv2.resize(img, (size, size))`` does:
    bilinear without antialiasing (:func:`cv2_linear_resize`). The HDML code stores its images so
    (``datasets/cub200_2011_converter.py``, ``cars196_converter.py``). Deterministic, so the decoded-image cache
    stores its output (its ``repr`` names every parameter: it enters the cache's fingerprint)."""

    cache_deterministic = True

    def __init__(self, size: int = 256) -> None:
        self.size = int(size)

    def __call__(self, image: Image.Image) -> Image.Image:
        array = np.asarray(image.convert("RGB"))
        return Image.fromarray(cv2_linear_resize(array, self.size, self.size))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


RESIZE_MODES = ("warp", "warp_cv2", "shorter", "content_pad")


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
    elif resize_mode == "warp_cv2":
        steps = [Cv2LinearResize(resize)]
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
