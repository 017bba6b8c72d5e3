"""``dml-prepare``: get a dataset, check its tree against the official layout and counts, say where it comes from.

    dml-prepare --sources                                  # where every dataset comes from, expected layouts
    dml-prepare cub200 data/CUB_200_2011 --download        # fetch the official archive, verify, extract, check
    dml-prepare cub200 data/CUB_200_2011                   # check a tree: split files, counts, unreadable images
    dml-prepare sop data/Stanford_Online_Products --quick  # existence only, no decoding

``--download`` works for the datasets whose authors publish an archive at a stable address with a known checksum
(:data:`ARCHIVES`); ``--url``/``--md5`` point it at a mirror. An interrupted download resumes from the ``.part`` file
(HTTP Range). For the others (licence forms, requests to the authors) it prints where to get the files.

Exit status: 0 = complete (files present, every image decodes, counts equal a full official download);
1 = something is missing, unreadable, failed to download, or the counts differ (the report says what);
2 = usage error.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path
from typing import Any

from dml_runner import DMLRunnerError
from dml_runner.datasets import cars196, cub200, folder, inshop, sop, vehicleid
from dml_runner.datasets.images import SOURCES, find_bad_images

DATASETS = ("cub200", "cars196", "sop", "inshop", "vehicleid", "folder")
SHOWN = 20  # bad images listed in full
CHUNK = 1 << 20

# Archives published by the datasets' authors at an address that has stayed put, with their checksums.
ARCHIVES: dict[str, dict[str, str]] = {
    "cub200": {"url": "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
               "file": "CUB_200_2011.tgz", "md5": "97eceeb196236b17998738112f37df78", "top": "CUB_200_2011"},
    "sop": {"url": "ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
            "file": "Stanford_Online_Products.zip", "md5": "7f73d41a2f44250d4779881525aea32e",
            "top": "Stanford_Online_Products"},
}


def describe(name: str) -> str:
    src = SOURCES[name]
    how = (f"dml-prepare {name} <dir>/{src['dir']} --download" if name in ARCHIVES
           else "manual (no stable public archive: follow the address above)")
    return (f"{name}: {src['title']}\n  download: {src['url']}\n  layout:   {src['layout']}\n"
            f"  get it:   {how}\n  use:      dml-run dataset={name} dataset.root=<path to {src['dir']}>")


def listed_images(name: str, root: Path) -> list[str]:
    """Every image path the split files name (raises DMLRunnerError for a missing root or split file)."""
    if not root.is_dir():
        raise DMLRunnerError(f"{root} does not exist")
    if name == "cub200":
        return cub200.read_cub(root)[0]
    if name == "cars196":
        return cars196.read_cars_annos(root)[0]
    if name == "sop":
        return sop.read_ebay_list(root, "Ebay_train.txt")[0] + sop.read_ebay_list(root, "Ebay_test.txt")[0]
    if name == "inshop":
        return inshop.read_partition(root)[0]
    if name == "vehicleid":
        paths = vehicleid.read_list(root, "train_list.txt")[0]
        for n in vehicleid.TEST_LISTS.values():
            paths += vehicleid.read_list(root, f"test_list_{n}.txt")[0]
        return list(dict.fromkeys(paths))  # the test lists overlap
    return folder.scan_tree(root)[1]


def variants(name: str) -> list[tuple[str, dict[str, Any]]]:
    """The builder settings whose counts are compared with the official ones."""
    if name == "vehicleid":
        return [(f"test_size={size}", {"test_size": size, "protocol": "original"}) for size in vehicleid.TEST_LISTS]
    return [("", {})]


BUILD = {"cub200": cub200.build, "cars196": cars196.build, "sop": sop.build, "inshop": inshop.build,
         "vehicleid": vehicleid.build, "folder": folder.build}


def check(name: str, root: Path, decode: bool = True) -> tuple[bool, list[str]]:
    """``(ok, report lines)`` for the tree at ``root``."""
    lines, ok = [f"checking {name} at {root}"], True
    try:
        paths = listed_images(name, root)
    except DMLRunnerError as err:
        return False, lines + [f"  ERROR: {err}"]
    lines.append(f"  split files parse: {len(paths)} distinct images listed")
    bad = find_bad_images(paths, decode=decode)
    what = "missing or unreadable" if decode else "missing (decoding not checked: --quick)"
    if bad:
        ok = False
        lines.append(f"  PROBLEM: {len(bad)} image(s) {what}:")
        lines += [f"    {p}" for p in bad[:SHOWN]] + ([f"    ... and {len(bad) - SHOWN} more"] if len(bad) > SHOWN else [])
        lines.append("  (dataset.skip_bad_images=true trains without them, but results are then not comparable)")
    else:
        lines.append(f"  all {len(paths)} images present" + (" and decodable" if decode else ""))
    for label, kwargs in variants(name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            splits = BUILD[name](str(root), skip_bad_images=True, **kwargs)
        counts, official = splits.info["counts"], splits.info.get("official_counts")
        lines.append(f"  counts{' (' + label + ')' if label else ''}:")
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
    if name not in ARCHIVES and url is None:
        raise DMLRunnerError(f"{name} has no stable public archive to download: get it from {SOURCES[name]['url']}, "
                             f"lay it out as {SOURCES[name]['layout']}, then run `dml-prepare {name} {root}` to check it")
    spec = ARCHIVES.get(name, {})
    url = url or spec["url"]
    md5 = md5 or spec.get("md5")
    top = spec.get("top", SOURCES[name]["dir"])
    if root.is_dir() and any(root.iterdir()):
        print(f"  {root} exists and is not empty: not downloading again (delete it to start over)")
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    archive = fetch(url, root.parent / (spec.get("file") or Path(url.split("?")[0]).name), md5)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dml-prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", choices=DATASETS)
    parser.add_argument("root", nargs="?", type=Path, help="the dataset's directory (e.g. data/CUB_200_2011)")
    parser.add_argument("--sources", action="store_true", help="print where to get every dataset and exit")
    parser.add_argument("--download", action="store_true",
                        help="fetch the official archive (where one exists), verify its checksum, extract, check")
    parser.add_argument("--url", help="with --download: a mirror of the archive")
    parser.add_argument("--md5", help="with --download --url: the mirror's archive checksum")
    parser.add_argument("--quick", action="store_true", help="check that images exist, without decoding them")
    args = parser.parse_args(argv)
    if args.sources:
        print("\n\n".join(describe(n) for n in DATASETS))
        return 0
    if args.dataset is None or args.root is None:
        parser.print_usage(sys.stderr)
        print("dml-prepare: error: give a dataset and its directory (or --sources)", file=sys.stderr)
        return 2
    if (args.url or args.md5) and not args.download:
        print("dml-prepare: error: --url/--md5 only make sense with --download", file=sys.stderr)
        return 2
    logging.getLogger("dml_runner.datasets").setLevel(logging.ERROR)  # the report below says it all
    root = args.root.expanduser()
    print(describe(args.dataset) + "\n")
    if args.download:
        try:
            download(args.dataset, root, args.url, args.md5)
        except DMLRunnerError as err:
            print(f"dml-prepare: error: {err}", file=sys.stderr)
            return 1
    ok, lines = check(args.dataset, root, decode=not args.quick)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
