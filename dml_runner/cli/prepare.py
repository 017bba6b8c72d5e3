"""``dml-prepare``: get a dataset, check its tree against the official layout and counts, say where it comes from.

    dml-prepare --sources                                  # where every dataset comes from, expected layouts
    dml-prepare cub200 data/CUB_200_2011 --download        # fetch the official archive, verify, extract, check
    dml-prepare cub200 data/CUB_200_2011                   # check a tree: split files, counts, unreadable images
    dml-prepare sop data/Stanford_Online_Products --quick  # existence only, no decoding
    dml-prepare cub200 data/CUB_200_2011 --cache transform=lifted_227   # also build the decoded-image cache

``--download`` works for the datasets whose authors publish an archive at a stable address with a known checksum
(``--sources`` says which); ``--url``/``--md5`` point it at a mirror. An interrupted download resumes from the
``.part`` file (HTTP Range). For the others (licence forms, requests to the authors) it prints where to get the files.
``--cache`` then builds the decoded-image caches (docs/CACHE.md) that ``dml-run dataset=<name>
dataset.root=<root>`` with the same overrides (``transform=...``, ``paths.cache_dir=...``) opens at its start.

Exit status: 0 = complete (files present, every image decodes, counts equal a full official download);
1 = something is missing, unreadable, failed to download, or the counts differ (the report says what);
2 = usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from dml_runner import DMLRunnerError
from dml_runner.datasets.prepare import check, describe, describe_cache, download
from dml_runner.datasets.registry import NAMES


def build_cache(name: str, root: Path, overrides: Sequence[str] = (), cache_dir: Path | None = None,
                progress: bool = True) -> list[str]:
    """Build, ahead of time, the decoded-image caches (docs/CACHE.md) that ``dml-run dataset=<name>
    dataset.root=<root> <overrides>`` would build at its start; the report lines (one per split).

    The config is composed as dml-run composes it, so the same overrides (``transform=lifted_227``,
    ``dataset.val_fraction=0.1``, ``paths.cache_dir=...``) name the same cache files, which the runs then open.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from dml_runner.build import build_dataset
    from dml_runner.config import conf_dir, register_configs, validate_config

    register_configs()
    given = [f"dataset={name}", f"dataset.root={root}", *overrides]
    if cache_dir is not None:
        given.append(f"paths.cache_dir={cache_dir}")
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose("config", overrides=given, return_hydra_config=False)
    except HydraException as err:
        raise DMLRunnerError(f"dml-prepare --cache: {err}") from None
    validate_config(cfg)
    mode = cfg.dataset.get("cache", "none")
    if mode == "none":
        raise DMLRunnerError(f"dataset.cache=none (dataset {name}): nothing to build; drop that override, or use "
                             "dataset.cache=auto")
    data = build_dataset(cfg, progress=progress)
    return describe_cache(data.info["decoded_cache"], mode)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dml-prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", choices=NAMES)
    parser.add_argument("root", nargs="?", type=Path, help="the dataset's directory (e.g. data/CUB_200_2011)")
    parser.add_argument("--sources", action="store_true", help="print where to get every dataset and exit")
    parser.add_argument("--download", action="store_true",
                        help="fetch the official archive (where one exists), verify its checksum, extract, check")
    parser.add_argument("--url", help="with --download: a mirror of the archive")
    parser.add_argument("--md5", help="with --download --url: the mirror's archive checksum")
    parser.add_argument("--quick", action="store_true", help="check that images exist, without decoding them")
    parser.add_argument("--cache", action="store_true",
                        help="after a successful check, build the decoded-image caches a dml-run with these "
                             "overrides uses (docs/CACHE.md)")
    parser.add_argument("overrides", nargs="*",
                        help="with --cache: dml-run overrides that choose the cache (transform=lifted_227, "
                             "paths.cache_dir=DIR, dataset.val_fraction=0.1)")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the flags
    if args.sources:
        print("\n\n".join(describe(n) for n in NAMES))
        return 0
    if args.dataset is None or args.root is None:
        parser.print_usage(sys.stderr)
        print("dml-prepare: error: give a dataset and its directory (or --sources)", file=sys.stderr)
        return 2
    if args.overrides and not args.cache:
        print("dml-prepare: error: overrides (KEY=VALUE) only make sense with --cache", file=sys.stderr)
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
    if args.cache and ok:
        try:
            print("\n".join(build_cache(args.dataset, root, args.overrides, progress=sys.stderr.isatty())))
        except DMLRunnerError as err:
            print(f"dml-prepare: error: {err}", file=sys.stderr)
            return 1
    elif args.cache:
        print("decoded-image cache not built: fix the tree first")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """dml-prepare; the datasets' own log lines are quiet while it reports (their level is restored after, so an
    in-process caller keeps its logging)."""
    quiet = logging.getLogger("dml_runner.datasets")
    level = quiet.level
    try:
        return _main(argv)
    finally:
        quiet.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
