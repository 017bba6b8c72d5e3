"""An exact cache of decoded, pre-transformed training and test images (``dataset.cache``, ``paths.cache_dir``).

Most paper transforms start with deterministic steps (caffe_227's 256x256 warp, lifted_227's crop to content and
white padding, every test transform's resize + centre crop, timm's eval resize). :func:`split_transform` cuts a
transform into that deterministic *prefix* and the (random) *tail*. :class:`DecodedCache` runs the prefix once per
image and stores its output losslessly as uint8 arrays in one memory-mapped file; :class:`CachedImageDataset` then
serves ``tail(image rebuilt from the cache)``, which is bit-identical to ``transform(load(i))`` of the uncached
dataset (the tail sees the same pixels, the same size and the same random draws).

File layout (``<cache_dir>/<slot>.dcache``, little-endian)::

    header (HEADER_SIZE bytes): magic, format version, item count, offsets, CRC-32 of index+metadata, CRC-32 of
                                the header, content fingerprint
    data:   the items' uint8 pixels, HxWxC (or HxW), one after the other
    index:  one INDEX_DTYPE row per item: offset into the file, height, width, channels, CRC-32 of its pixels
    meta:   JSON (prefix description, item count, when and how it was built)

The *slot* name hashes the prefix's description, the library versions that compute it and the list of item paths;
the *content fingerprint* in the header hashes the slot and every file's size and modification time. A cache whose
files changed since it was built is therefore rebuilt in place (same slot), a changed prefix uses another slot.
Sizes and mtimes cost one ``stat`` per file when a run starts, where content hashes would read the whole dataset
(gigabytes) at every start; any rewrite of an image updates its mtime.

Builders take an exclusive ``fcntl`` lock on ``<slot>.lock``, write ``<slot>.<pid>.tmp`` and rename it over the
slot atomically; a second builder waits for the lock and then reuses the finished file. Readers never lock: a
rename leaves an open memory map on the old file intact. A file whose size, header, index checksum or sampled item
checksums do not match is reported as damaged and rebuilt.

Integration: :func:`apply_decoded_cache` wraps the train/val/test datasets of a :class:`DatasetSplits` (``mode``
``"auto"``: cache where exact; ``"none"``: off; ``"fixed_scale"``: also cache random-first transforms at a fixed
scale, an approximation recorded in ``splits.info["decoded_cache"]``).
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dml_runner import DMLRunnerError
from dml_runner.config import CACHE_MODES

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAGIC = b"DMLDCACH"
# magic, version, flags, n_items, data_offset, index_offset, meta_len, index_crc, header_crc, fingerprint (hex)
_HEADER = struct.Struct("<8sIIQQQQII64s")
HEADER_SIZE = 256  # _HEADER.size rounded up; the rest is zero
INDEX_DTYPE = np.dtype([("offset", "<u8"), ("height", "<u4"), ("width", "<u4"), ("channels", "<u4"),
                        ("crc", "<u4")])
SUFFIX = ".dcache"
SAMPLED_CHECKS = 8  # items whose pixels are checksummed when a cache is opened (all of them with verify(full=True))


class DamagedCacheWarning(UserWarning):
    """A cache file was truncated or corrupt and is rebuilt."""


# ------------------------------------------------------------------------------------------- transform splitting

def _deterministic_types() -> tuple[type, ...]:
    from torchvision import transforms as T

    from dml_runner.datasets.transforms import CropToContent, LongerSidePad

    return (T.Resize, T.CenterCrop, CropToContent, LongerSidePad)


def is_deterministic(step: Any) -> bool:
    """Whether ``step`` maps a PIL image to the same output every time (no random draw, no hidden state).

    The torchvision resize / centre crop and our content crop / white padding are; any other class can declare it
    with a class attribute ``cache_deterministic = True`` (its ``repr`` must then name every parameter, it enters
    the cache fingerprint).
    """
    if getattr(step, "cache_deterministic", False) is True:
        return True
    return type(step) in _deterministic_types()


class Prefix:
    """The deterministic steps of a transform, applied to a PIL image; ``description`` identifies them."""

    def __init__(self, steps: Sequence[Callable[[Any], Any]], description: str | None = None) -> None:
        self.steps = list(steps)
        self.description = description or " -> ".join(" ".join(repr(s).split()) for s in self.steps)

    def __call__(self, image: Any) -> Any:
        for step in self.steps:
            image = step(image)
        return image

    def __repr__(self) -> str:
        return f"Prefix({self.description})"


class Tail:
    """The steps of a transform after its prefix, in order (a plain list; pickles to DataLoader workers)."""

    def __init__(self, steps: Sequence[Callable[[Any], Any]]) -> None:
        self.steps = list(steps)

    def __call__(self, image: Any) -> Any:
        for step in self.steps:
            image = step(image)
        return image

    def __repr__(self) -> str:
        return "Tail(" + ", ".join(repr(s) for s in self.steps) + ")"


@dataclass
class TransformSplit:
    """``transform == tail o prefix`` where ``exact``; ``prefix is None``: nothing to cache (``reason`` says why).

    ``approximation`` is set (and ``exact`` False) when a random-first transform was given a fixed-scale prefix on
    request: its batches then differ from the uncached pipeline's, which must be recorded with the results.
    """

    prefix: Prefix | None
    tail: Callable[[Any], Any]
    exact: bool = True
    reason: str = ""
    approximation: str | None = None

    def record(self) -> dict[str, Any]:
        """What results.json should say about this split."""
        out: dict[str, Any] = {"cached": self.prefix is not None}
        if self.prefix is not None:
            out.update(exact=self.exact, prefix=self.prefix.description)
        if self.reason:
            out["reason"] = self.reason
        if self.approximation:
            out["approximation"] = self.approximation
        return out


def _steps(transform: Any) -> list[Any] | None:
    from torchvision import transforms as T

    if isinstance(transform, T.Compose) or type(transform).__name__ == "Compose" and hasattr(transform, "transforms"):
        return list(transform.transforms)
    if isinstance(transform, Tail):
        return list(transform.steps)
    return None


def split_transform(transform: Any, approximate: str | None = None, scale_size: int = 256) -> TransformSplit:
    """Cut ``transform`` (a Compose of PIL steps) into its longest deterministic prefix and the rest.

    A transform whose first step is random (RandomResizedCrop of rrc_224 / timm training) gets no prefix, unless
    ``approximate="fixed_scale"``: then images are stored with their shorter side resized to ``scale_size``
    (bilinear, as torchvision's Resize) and the whole transform runs on that copy; an approximation, declared in
    the returned split.
    """
    if approximate not in (None, "fixed_scale"):
        raise ValueError(f"approximate must be None or 'fixed_scale', got {approximate!r}")
    if transform is None:
        return TransformSplit(None, transform, reason="no transform")
    steps = _steps(transform)
    if steps is None:
        return TransformSplit(None, transform, reason=f"not a Compose of known steps: {type(transform).__name__}")
    n = 0
    while n < len(steps) and is_deterministic(steps[n]):
        n += 1
    if n:
        return TransformSplit(Prefix(steps[:n]), Tail(steps[n:]))
    first = " ".join(repr(steps[0]).split()) if steps else "nothing"
    if approximate == "fixed_scale":
        from torchvision import transforms as T

        resize = T.Resize(scale_size)
        return TransformSplit(Prefix([resize]), Tail(steps), exact=False,
                              approximation=f"images stored with the shorter side resized to {scale_size} before "
                                            f"{first}: crops are drawn from that copy, not from the full-size image")
    return TransformSplit(None, transform, reason=f"first step is random ({first}); no exact prefix to cache")


# -------------------------------------------------------------------------------------------------- fingerprints

def _versions() -> str:
    import PIL
    import torchvision

    return f"format {FORMAT_VERSION}; Pillow {PIL.__version__}; torchvision {torchvision.__version__}"


def slot_name(paths: Sequence[str], description: str, tag: str = "") -> str:
    """``<tag>-<hash>``: the hash of the prefix description, the library versions and the list of paths."""
    h = hashlib.sha256()
    h.update(f"{description}\n{_versions()}\n{len(paths)}\n".encode())
    for p in paths:
        h.update(os.path.abspath(p).encode("utf-8", "surrogateescape") + b"\0")
    safe = "".join(c if c.isalnum() or c in "_-" else "_" for c in tag)[:40].strip("_")
    return f"{safe + '-' if safe else ''}{h.hexdigest()[:20]}"


def content_fingerprint(paths: Sequence[str], slot: str) -> str:
    """sha256 hex of the slot and every file's (size, mtime in ns): changes when any file is rewritten."""
    h = hashlib.sha256(slot.encode())
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as err:
            raise DMLRunnerError(f"decoded cache: cannot stat image {p} ({err.strerror}); check the dataset "
                                 f"(`dml-prepare <dataset> <root>`) or set dataset.cache=none") from err
        h.update(struct.pack("<qq", st.st_size, st.st_mtime_ns))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------- the cache

def check_cache_dir(cache_dir: Path | str, option: str = "paths.cache_dir") -> Path:
    """Create ``cache_dir`` and prove it writable (a real file is created and removed); else one DMLRunnerError."""
    d = Path(cache_dir).expanduser()
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".write-test-"):
            pass
    except OSError as err:
        raise DMLRunnerError(f"{option}={d} is not a writable directory ({err.strerror or err}): set {option} "
                             f"to a writable directory, or turn the decoded-image cache off with "
                             f"dataset.cache=none") from None
    return d


def _to_array(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        if image.mode not in ("RGB", "L"):
            raise ValueError(f"decoded cache stores RGB or L images, the prefix gave mode {image.mode}")
        arr = np.asarray(image)
    else:
        arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3)):
        raise ValueError(f"decoded cache stores uint8 HxW or HxWx{{1,3}} images, got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(arr)  # uint8 HxW -> "L", HxWx3 -> "RGB"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class CacheDamaged(Exception):
    """Internal: why a cache file cannot be used."""


@dataclass
class DecodedCache:
    """One opened cache file: ``array(i)`` (a read-only view into the memory map) and ``image(i)`` (PIL)."""

    path: Path
    fingerprint: str
    index: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    built: bool = False  # True when this call built the file (False: an existing one was opened)
    _mm: np.memmap | None = field(default=None, repr=False)

    # --------------------------------------------------------------------------------------------- reading
    @classmethod
    def open(cls, path: Path | str, fingerprint: str | None = None,
             sample_checks: int = SAMPLED_CHECKS) -> DecodedCache:
        """Open and check a cache file; raises :class:`CacheDamaged` with the reason when unusable."""
        path = Path(path)
        try:
            size = path.stat().st_size
            with open(path, "rb") as fh:
                head = fh.read(HEADER_SIZE)
                if len(head) < HEADER_SIZE:
                    raise CacheDamaged(f"file of {size} bytes is shorter than its header")
                magic, version, _flags, n, data_off, index_off, meta_len, index_crc, header_crc, fp = \
                    _HEADER.unpack_from(head)
                if magic != MAGIC:
                    raise CacheDamaged("not a decoded-cache file (bad magic)")
                if zlib.crc32(head[: _HEADER.size - 64 - 4]) != header_crc:
                    raise CacheDamaged("header checksum mismatch")
                if version != FORMAT_VERSION:
                    raise CacheDamaged(f"format version {version}, this code reads {FORMAT_VERSION}")
                expected = index_off + n * INDEX_DTYPE.itemsize + meta_len
                if size != expected:
                    raise CacheDamaged(f"file has {size} bytes, its header says {expected} (truncated?)")
                fh.seek(index_off)
                tail = fh.read(n * INDEX_DTYPE.itemsize + meta_len)
        except OSError as err:
            raise CacheDamaged(f"cannot read: {err}") from None
        if zlib.crc32(tail) != index_crc:
            raise CacheDamaged("index checksum mismatch")
        index = np.frombuffer(tail[: n * INDEX_DTYPE.itemsize], dtype=INDEX_DTYPE).copy()
        meta = json.loads(tail[n * INDEX_DTYPE.itemsize:].decode()) if meta_len else {}
        nbytes = index["height"].astype(np.int64) * index["width"] * index["channels"]
        if n and (index["offset"][0] != data_off or np.any(index["offset"][1:] != index["offset"][:-1] + nbytes[:-1])
                  or int(index["offset"][-1] + nbytes[-1]) != index_off):
            raise CacheDamaged("index offsets do not tile the data region")
        found = fp.decode("ascii", "replace")
        if fingerprint is not None and found != fingerprint:
            raise CacheDamaged("the image files changed since the cache was built (sizes or modification times)")
        cache = cls(path, found, index, meta)
        cache.verify(full=False, samples=sample_checks)
        return cache

    def _data(self) -> np.memmap:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers (spawn) map the file themselves
        state = dict(self.__dict__)
        state["_mm"] = None
        return state

    def __len__(self) -> int:
        return len(self.index)

    def array(self, i: int) -> np.ndarray:
        """Item ``i`` as a read-only uint8 view into the memory map (no copy), HxWxC or HxW."""
        row = self.index[i]
        h, w, c = int(row["height"]), int(row["width"]), int(row["channels"])
        off = int(row["offset"])
        flat = self._data()[off: off + h * w * c]
        return np.ndarray((h, w, c) if c > 1 else (h, w), dtype=np.uint8, buffer=flat)

    def image(self, i: int) -> Image.Image:
        """Item ``i`` as the PIL image the prefix produced."""
        return _from_array(self.array(i))

    def verify(self, full: bool = True, samples: int = SAMPLED_CHECKS) -> None:
        """Check the pixels' CRC-32 of every item (``full``) or of ``samples`` items spread over the file."""
        n = len(self.index)
        if full or not n:
            which: Sequence[int] = range(n)
        else:
            which = sorted(set(np.linspace(0, n - 1, min(n, samples)).astype(int).tolist()))
        for i in which:
            if zlib.crc32(self.array(i)) != int(self.index[i]["crc"]):
                raise CacheDamaged(f"item {i}: pixel checksum mismatch")

    @property
    def nbytes(self) -> int:
        """Size of the file on disk, in bytes."""
        return self.path.stat().st_size

    def describe(self) -> str:
        """The log line: where, how many images, how big."""
        return (f"decoded cache {self.path}: {len(self)} images, {human_bytes(self.nbytes)} on disk "
                f"(prefix: {self.meta.get('prefix', '?')})")


def cache_size_bytes(cache_dir: Path | str) -> int:
    """Bytes on disk of every decoded-cache file in ``cache_dir`` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in Path(cache_dir).expanduser().glob(f"*{SUFFIX}") if p.is_file())


def _write_cache(tmp: Path, n: int, produce: Callable[[int], np.ndarray], fingerprint: str, meta: dict[str, Any],
                 progress: bool, desc: str, threads: int) -> None:
    index = np.zeros(n, dtype=INDEX_DTYPE)
    from tqdm import tqdm

    with open(tmp, "wb") as fh:
        fh.write(b"\0" * HEADER_SIZE)
        offset = HEADER_SIZE
        bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, dynamic_ncols=True, mininterval=1.0)
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:  # PIL releases the GIL while decoding/resizing
            chunk = max(16, 4 * threads)
            for start in range(0, n, chunk):
                for i, arr in zip(range(start, min(n, start + chunk)),
                                  pool.map(produce, range(start, min(n, start + chunk)))):
                    h, w = arr.shape[:2]
                    c = arr.shape[2] if arr.ndim == 3 else 1
                    index[i] = (offset, h, w, c, zlib.crc32(arr))
                    fh.write(arr.tobytes())
                    offset += arr.nbytes
                    bar.update(1)
        bar.close()
        meta_bytes = json.dumps(meta, sort_keys=True).encode()
        tail = index.tobytes() + meta_bytes
        fh.write(tail)
        head = bytearray(_HEADER.pack(MAGIC, FORMAT_VERSION, 0, n, HEADER_SIZE, offset, len(meta_bytes),
                                      zlib.crc32(tail), 0, fingerprint.encode("ascii")))
        struct.pack_into("<I", head, _HEADER.size - 64 - 4, zlib.crc32(bytes(head[: _HEADER.size - 64 - 4])))
        fh.seek(0)
        fh.write(bytes(head))
        fh.flush()
        os.fsync(fh.fileno())


def open_or_build(cache_dir: Path | str, paths: Sequence[str], load: Callable[[int], Any], prefix: Prefix, *,
                  tag: str = "", progress: bool = True, threads: int | None = None,
                  option: str = "paths.cache_dir") -> DecodedCache:
    """The cache of ``prefix(load(i))`` for every ``i`` (``paths[i]`` is item i's file): opened when a valid one
    exists, else built once (under a file lock, into a temporary file renamed into place)."""
    cache_dir = Path(cache_dir).expanduser()
    slot = slot_name(paths, prefix.description, tag)
    fingerprint = content_fingerprint(paths, slot)
    path = cache_dir / f"{slot}{SUFFIX}"
    problem = None
    if path.exists():
        try:
            return DecodedCache.open(path, fingerprint)
        except CacheDamaged as err:
            problem = str(err)
    check_cache_dir(cache_dir, option)  # one line before any work when we would have to build
    lock_path = cache_dir / f"{slot}.lock"
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("decoded cache %s: another process is building it; waiting", path)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if path.exists():  # built (or still damaged) by whoever held the lock before us
                try:
                    return DecodedCache.open(path, fingerprint)
                except CacheDamaged as err:
                    problem = str(err)
            if problem and "changed since" not in problem:
                message = f"decoded cache {path} is damaged ({problem}); rebuilding it"
                log.warning(message)
                warnings.warn(message, DamagedCacheWarning, stacklevel=2)
            elif problem:
                log.info("decoded cache %s: %s; rebuilding it", path, problem)
            for stale in glob.glob(glob.escape(str(cache_dir / slot)) + ".*.tmp"):  # left by a killed builder
                Path(stale).unlink(missing_ok=True)
            n = len(paths)
            if n:
                first = _to_array(prefix(load(0)))
                free = shutil.disk_usage(cache_dir).free
                estimate = first.nbytes * n
                if estimate > free:
                    raise DMLRunnerError(f"{option}={cache_dir} has {human_bytes(free)} free, the decoded cache "
                                         f"needs about {human_bytes(estimate)}: free space, point {option} "
                                         f"elsewhere, or set dataset.cache=none")
            meta = {"prefix": prefix.description, "versions": _versions(), "items": n,
                    "first_path": paths[0] if n else None, "built_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                     time.gmtime())}
            tmp = cache_dir / f"{slot}.{os.getpid()}.tmp"
            started = time.perf_counter()
            try:
                _write_cache(tmp, n, lambda i: _to_array(prefix(load(i))), fingerprint, meta, progress,
                             f"decoded cache {tag or slot}", threads or min(8, os.cpu_count() or 1))
                os.replace(tmp, path)
            except OSError as err:
                tmp.unlink(missing_ok=True)
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DMLRunnerError(f"{option}={cache_dir} ran out of disk space while writing the decoded "
                                         f"cache: free space, point {option} elsewhere, or set "
                                         f"dataset.cache=none") from None
                raise
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            cache = DecodedCache.open(path, fingerprint)
            cache.built = True
            log.info("decoded cache %s: built %d images in %.1f s", path, n, time.perf_counter() - started)
            return cache
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------- the dataset adapter

def _root_dataset(dataset: Any) -> Any:
    while hasattr(dataset, "base") and hasattr(dataset, "indices"):
        dataset = dataset.base
    return dataset


def load_description(dataset: Any) -> str:
    """What ``dataset.load`` does, for the fingerprint: a ``cache_load_description`` attribute, else its class."""
    root = _root_dataset(dataset)
    return getattr(root, "cache_load_description", None) or f"{type(root).__module__}.{type(root).__qualname__}.load"


def _cache_unavailable(dataset: Any) -> str | None:
    paths = getattr(dataset, "paths", None)
    if not paths:
        return "the dataset has no image paths"
    if not all(os.path.isfile(p) for p in (paths[0], paths[-1])):
        return "the dataset's items are not image files"
    return None


class CachedImageDataset(Dataset):
    """``base`` whose items come from a decoded cache: ``__getitem__(i) == (tail(cache.image(i)), label)``.

    A drop-in for ``base`` (a :class:`~dml_runner.datasets.base.LabelledDataset`): ``labels``, ``paths``,
    ``class_names``, ``name``, ``in_channels`` are the base's; ``transform`` is the *full* transform and ``load``
    the base's uncached loader, so views built from this dataset with another transform (``SubsetLabelledDataset``,
    Divide & Conquer's re-embedding) stay correct. Assigning another ``transform`` drops the cache for it (use
    :meth:`with_transform` to get a cached view for a different transform).
    """

    def __init__(self, base: Any, split: TransformSplit, cache: DecodedCache, cache_dir: Path | str,
                 tag: str = "") -> None:
        if split.prefix is None:
            raise ValueError("CachedImageDataset needs a split with a prefix")
        if len(cache) != len(base):
            raise ValueError(f"cache has {len(cache)} items, the dataset {len(base)}")
        self.base = base
        self.split = split
        self.cache = cache
        self.cache_dir = Path(cache_dir)
        self.tag = tag
        self._cached_for = self._transform = base.transform

    # the LabelledDataset interface, delegated to the base
    labels = property(lambda self: self.base.labels)
    paths = property(lambda self: self.base.paths)
    class_names = property(lambda self: self.base.class_names)
    name = property(lambda self: self.base.name)
    in_channels = property(lambda self: self.base.in_channels)
    num_classes = property(lambda self: self.base.num_classes)

    def item_paths(self) -> np.ndarray:
        return self.base.item_paths()

    def item_class_names(self) -> np.ndarray:
        return self.base.item_class_names()

    def load(self, index: int) -> Any:
        return self.base.load(index)

    @property
    def transform(self) -> Any:
        return self._transform

    @transform.setter
    def transform(self, value: Any) -> None:
        self._transform = value

    @property
    def cache_active(self) -> bool:
        """Whether items come from the cache (False once another transform was assigned)."""
        return self._transform is self._cached_for

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not self.cache_active:
            image = self.base.load(index)
            image = self._transform(image) if self._transform is not None else image
            return image, int(self.base.labels[index])
        return self.split.tail(self.cache.image(index)), int(self.base.labels[index])

    def with_transform(self, transform: Any, progress: bool = True) -> Any:
        """A view of the same items through ``transform``, cached when ``transform`` has an exact prefix."""
        from dml_runner.datasets.base import SubsetLabelledDataset

        view = SubsetLabelledDataset(self.base, np.arange(len(self.base)), transform=transform)
        return cached_dataset(view, self.cache_dir, progress=progress, tag=self.tag)

    def __repr__(self) -> str:
        return f"CachedImageDataset({len(self)} items, {self.cache.path.name}, tail={self.split.tail!r})"


def cached_dataset(dataset: Any, cache_dir: Path | str, approximate: str | None = None, progress: bool = True,
                   tag: str = "", option: str = "paths.cache_dir") -> Any:
    """``dataset`` served from a decoded cache of its transform's deterministic prefix, or ``dataset`` itself
    (unchanged) when nothing can be cached; ``.decoded_cache_record`` on the result says which and why."""
    split = split_transform(getattr(dataset, "transform", None), approximate=approximate)
    reason = split.reason or (_cache_unavailable(dataset) if split.prefix is not None else None)
    if split.prefix is None or reason:
        record = {"cached": False, "reason": reason or split.reason}
        try:
            dataset.decoded_cache_record = record
        except AttributeError:
            pass
        return dataset
    prefix = Prefix(split.prefix.steps, f"{load_description(dataset)} -> {split.prefix.description}")
    cache = open_or_build(cache_dir, list(dataset.paths), dataset.load, prefix, tag=tag, progress=progress,
                          option=option)
    split = TransformSplit(prefix, split.tail, split.exact, split.reason, split.approximation)
    wrapped = CachedImageDataset(dataset, split, cache, cache_dir, tag)
    wrapped.decoded_cache_record = {**split.record(), "file": str(cache.path), "bytes": cache.nbytes,
                                    "images": len(cache)}
    log.info("%s", cache.describe())
    return wrapped


def apply_decoded_cache(splits: Any, mode: str, cache_dir: Path | str | None, progress: bool = True,
                        option: str = "paths.cache_dir") -> Any:
    """Serve ``splits.train`` / ``val`` / ``test`` from decoded caches (``mode`` = ``dataset.cache``).

    ``"none"``: unchanged. ``"auto"``: every split whose transform starts with deterministic steps is cached
    exactly (bit-identical batches). ``"fixed_scale"``: as auto, and random-first transforms are cached at a fixed
    scale (an approximation). What was done is recorded in ``splits.info["decoded_cache"]`` (results.json).
    The cache directory is checked (one DMLRunnerError naming ``option``) before any image is read.
    """
    if mode not in CACHE_MODES:
        raise DMLRunnerError(f"dataset.cache={mode!r}: choose one of {', '.join(CACHE_MODES)} "
                             f"(none turns the decoded-image cache off)")
    if mode == "none":
        splits.info["decoded_cache"] = {"mode": "none"}
        return splits
    if cache_dir is None:
        raise DMLRunnerError(f"dataset.cache={mode} needs {option}: set it to a writable directory, or set "
                             f"dataset.cache=none")
    cache_dir = Path(cache_dir).expanduser()
    approximate = "fixed_scale" if mode == "fixed_scale" else None
    planned = [s for s in ("train", "val", "test") if getattr(splits, s, None) is not None
               and split_transform(getattr(splits, s).transform, approximate).prefix is not None]
    if planned:
        check_cache_dir(cache_dir, option)
    record: dict[str, Any] = {"mode": mode, "dir": str(cache_dir)}
    for name in ("train", "val", "test"):
        ds = getattr(splits, name, None)
        if ds is None:
            continue
        new = cached_dataset(ds, cache_dir, approximate=approximate, progress=progress,
                             tag=f"{splits.name}-{name}", option=option)
        setattr(splits, name, new)
        record[name] = getattr(new, "decoded_cache_record", {"cached": False})
    record["bytes"] = sum(r.get("bytes", 0) for r in record.values() if isinstance(r, dict))
    splits.info["decoded_cache"] = record
    if record["bytes"]:
        log.info("decoded caches of this run: %s in %s", human_bytes(record["bytes"]), cache_dir)
    return splits
