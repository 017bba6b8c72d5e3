"""Get a dataset, check its tree against the official layout and counts, say where it comes from: the library of
``dml-prepare`` (:mod:`dml_runner.cli.prepare`), which reads every fact from the dataset's spec (the registry).

:func:`download` works for the datasets whose authors publish an archive at a stable address with a known checksum
(``DatasetSpec.archive``); ``url``/``md5`` point it at a mirror. An interrupted download resumes from the ``.part``
file (HTTP Range). For the others (licence forms, requests to the authors) it says where to get the files.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path
from typing import Any

from dml_runner import DMLRunnerError
from dml_runner.datasets.images import find_bad_images
from dml_runner.datasets.registry import SPECS

SHOWN = 20  # bad images listed in full
CHUNK = 1 << 20


def describe(name: str) -> str:
    """``name``'s paragraph of ``dml-prepare --sources``: what it is, where to get it, its layout, how to use it."""
    spec = SPECS[name]
    how = (f"dml-prepare {name} <dir>/{spec.dir} --download" if spec.archive is not None
           else "manual (no stable public archive: follow the address above)")
    return (f"{name}: {spec.title}\n  download: {spec.url}\n  layout:   {spec.layout}\n"
            f"  get it:   {how}\n  use:      dml-run dataset={name} dataset.root=<path to {spec.dir}>")


def listed_images(name: str, root: Path) -> list[str]:
    """Every image path the split files name (raises DMLRunnerError for a missing root or split file)."""
    if not root.is_dir():
        raise DMLRunnerError(f"{root} does not exist")
    return SPECS[name].listed_images(root)


def check(name: str, root: Path, decode: bool = True) -> tuple[bool, list[str]]:
    """``(ok, report lines)`` for the tree at ``root``."""
    lines, ok = [f"checking {name} at {root}"], True
    try:
        paths = listed_images(name, root)
    except DMLRunnerError as err:
        return False, lines + [f"  ERROR: {err}"]
    lines.append(f"  split files parse: {len(paths)} distinct images listed")
    bad = find_bad_images(paths, decode=decode)
    what = "missing or unreadable" if decode else "missing or cut short (not decoded: --quick)"
    if bad:
        ok = False
        lines.append(f"  PROBLEM: {len(bad)} image(s) {what}:")
        lines += [f"    {p}" for p in bad[:SHOWN]] + ([f"    ... and {len(bad) - SHOWN} more"] if len(bad) > SHOWN else [])
        lines.append("  (dataset.skip_bad_images=true trains without them, but results are then not comparable)")
    else:
        lines.append(f"  all {len(paths)} images present" + (" and decodable" if decode else ""))
    for variant in SPECS[name].variants:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            splits = SPECS[name].build(str(root), skip_bad_images=True, **variant.settings)
        counts, official = splits.info["counts"], splits.info.get("official_counts")
        lines.append(f"  counts{' (' + variant.label + ')' if variant.label else ''}:")
        for key, value in counts.items():
            want = None if official is None else official.get(key)
            mark = "" if want is None else ("  ok" if want == value else f"  DIFFERS (official {want})")
            lines.append(f"    {key:15s} {value:8d}{mark}")
        if "count_warning" in splits.info:
            ok = False
    lines.append("  OK: complete official tree" if ok else "  NOT OK: fix the problems above (see docs/DATASETS.md)")
    return ok, lines


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, dest: Path, md5: str | None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a partial file with an HTTP Range request.

    A finished file whose MD5 matches is reused; a mismatch deletes the download and raises (a retry starts over).
    """
    if dest.is_file() and (md5 is None or md5_of(dest) == md5):
        return dest
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url)
    if have and url.startswith(("http://", "https://")):
        request.add_header("Range", f"bytes={have}-")
    expected = None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            resumed = bool(have) and getattr(response, "status", None) == 206
            length = response.headers.get("Content-Length")
            expected = int(length) + (have if resumed else 0) if length else None
            print(f"  {'resuming at byte ' + str(have) if resumed else 'downloading'} {url}"
                  + (f" ({expected} bytes)" if expected else ""), flush=True)
            with open(part, "ab" if resumed else "wb") as out:
                shutil.copyfileobj(response, out, CHUNK)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        raise DMLRunnerError(f"download of {url} failed ({err}); what arrived is kept in {part}, run the same "
                             "command again to resume, or pass --url with a mirror") from err
    if expected is not None and part.stat().st_size < expected:
        raise DMLRunnerError(f"download of {url} stopped at byte {part.stat().st_size} of {expected}; what arrived "
                             f"is kept in {part}, run the same command again to resume")
    if md5 is not None:
        got = md5_of(part)
        if got != md5:
            part.unlink()
            raise DMLRunnerError(f"{url}: checksum mismatch (md5 {got}, expected {md5}); the file was deleted, run "
                                 "the command again (or pass --md5 for a mirror that serves another archive)")
    part.replace(dest)
    return dest


def _safe_members(names: list[str], where: Path) -> None:
    base = where.resolve()
    for name in names:
        target = (where / name).resolve()
        if target != base and base not in target.parents:
            raise DMLRunnerError(f"archive member {name!r} would be written outside {where}: refusing to extract")


def extract(archive: Path, where: Path) -> None:
    """Unpack a .tgz/.tar/.zip into ``where`` after checking that no member escapes it."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            _safe_members(zf.namelist(), where)
            zf.extractall(where)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            _safe_members(tf.getnames(), where)
            if hasattr(tarfile, "data_filter"):  # refuses links and devices too (Python >= 3.10.12 / 3.11.4)
                tf.extractall(where, filter="data")
            else:
                tf.extractall(where)
    else:
        raise DMLRunnerError(f"{archive} is neither a tar nor a zip archive")


def download(name: str, root: Path, url: str | None = None, md5: str | None = None) -> None:
    """Fetch, verify and extract ``name``'s archive so that its top directory becomes ``root``."""
    spec = SPECS[name]
    if spec.archive is None and url is None:
        raise DMLRunnerError(f"{name} has no stable public archive to download: get it from {spec.url}, "
                             f"lay it out as {spec.layout}, then run `dml-prepare {name} {root}` to check it")
    url = url or spec.archive.url
    md5 = md5 or (spec.archive.md5 if spec.archive is not None else None)
    top = spec.archive.top if spec.archive is not None else spec.dir
    file = spec.archive.file if spec.archive is not None else None
    if root.is_dir() and any(root.iterdir()):
        print(f"  {root} exists and is not empty: not downloading again (delete it to start over)")
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    archive = fetch(url, root.parent / (file or Path(url.split("?")[0]).name), md5)
    print(f"  checksum ok, extracting {archive.name}", flush=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".extract-") as tmp:
        extract(archive, Path(tmp))
        entries = [p for p in Path(tmp).iterdir() if not p.name.startswith(".")]
        src = Path(tmp) / top if (Path(tmp) / top).is_dir() else (entries[0] if len(entries) == 1 else Path(tmp))
        if src == Path(tmp):
            root.mkdir(parents=True, exist_ok=True)
            for entry in entries:
                entry.replace(root / entry.name)
        else:
            if root.is_dir():
                root.rmdir()
            src.replace(root)
    archive.unlink()


def describe_cache(record: dict[str, Any], mode: str) -> list[str]:
    """The report lines of a run's decoded-image caches (``data.info["decoded_cache"]``), one per split."""
    from dml_runner.datasets.decoded_cache import human_bytes

    lines = [f"decoded-image cache ({mode}) in {record['dir']}:"]
    for split in ("train", "val", "test"):
        entry = record.get(split)
        if entry is None:
            continue
        if entry.get("cached"):
            lines.append(f"  {split}: {entry['images']} images, {human_bytes(entry['bytes'])} ({entry['file']})"
                         + ("" if entry.get("exact", True) else f"; APPROXIMATE: {entry.get('approximation')}"))
        else:
            lines.append(f"  {split}: not cached ({entry.get('reason', '?')})")
    lines.append(f"  total {human_bytes(record['bytes'])}")
    return lines
