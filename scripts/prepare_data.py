#!/usr/bin/env python
"""Check a downloaded dataset tree and say where to get it and how to lay it out.

    python scripts/prepare_data.py --sources                 # where to download every dataset, expected layouts
    python scripts/prepare_data.py cub200 data/CUB_200_2011  # check a tree: split files, counts, unreadable images
    python scripts/prepare_data.py sop data/Stanford_Online_Products --quick   # existence only, no decoding

Exit status: 0 = complete (files present, every image decodes, counts equal a full official download);
1 = something is missing, unreadable or the counts differ (the report says what); 2 = usage error.
Nothing is downloaded: these datasets need a licence click-through or a request to the authors.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from dml_runner import DMLRunnerError
from dml_runner.datasets import cars196, cub200, folder, inshop, sop, vehicleid
from dml_runner.datasets.images import SOURCES, find_bad_images

DATASETS = ("cub200", "cars196", "sop", "inshop", "vehicleid", "folder")
SHOWN = 20  # bad images listed in full


def describe(name: str) -> str:
    src = SOURCES[name]
    return (f"{name}: {src['title']}\n  download: {src['url']}\n  layout:   {src['layout']}\n"
            f"  use:      dml-run dataset={name} dataset.root=<path to {src['dir']}>")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", choices=DATASETS)
    parser.add_argument("root", nargs="?", type=Path)
    parser.add_argument("--sources", action="store_true", help="print where to get every dataset and exit")
    parser.add_argument("--quick", action="store_true", help="check that images exist, without decoding them")
    args = parser.parse_args(argv)
    if args.sources:
        print("\n\n".join(describe(n) for n in DATASETS))
        return 0
    if args.dataset is None or args.root is None:
        parser.print_usage(sys.stderr)
        print("error: give a dataset and its root (or --sources)", file=sys.stderr)
        return 2
    logging.getLogger("dml_runner.datasets").setLevel(logging.ERROR)  # the report below says it all
    print(describe(args.dataset) + "\n")
    ok, lines = check(args.dataset, args.root.expanduser(), decode=not args.quick)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
