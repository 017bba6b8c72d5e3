#!/usr/bin/env python
"""The wheels an offline GPU node needs besides its own torch stack (``make wheelhouse``; docs/PERFORMANCE.md).

A typical GPU node's Python already has torch, torchvision, timm, numpy, pandas, scipy, scikit-learn, matplotlib,
pillow, pyyaml and tqdm, but not these pure-Python packages that dml-runner imports: hydra-core, omegaconf,
antlr4-python3-runtime (hydra's parser; PyPI has only its source, so it is built into a wheel here) and
pytorch-metric-learning (``loss=pml``). ``--faiss`` adds faiss-cpu (about 30 MB; the faiss backends). The folder is
then copied to the node next to the checkout, and ``scripts/gpu_check.sh`` installs it with ``--no-index``.

    python scripts/wheelhouse.py wheelhouse                        # from PyPI, for Python 3.12 on manylinux x86-64
    python scripts/wheelhouse.py wheelhouse --python-version 3.11 --faiss
    python scripts/wheelhouse.py wheelhouse --from-installed       # no network: wheels of this environment's copies

``--from-installed`` packs the pure-Python packages as installed in the running interpreter (same versions, any
Python 3) into wheels; the test suite uses it to exercise the offline install without a network.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import importlib.metadata as md
import io
import re
import subprocess
import sys
import zipfile
from pathlib import Path

# distribution -> the version range dml-runner works with (hydra-core 1.3 needs antlr4 4.9.*)
PURE = {
    "hydra-core": "hydra-core>=1.3.2,<1.4",
    "omegaconf": "omegaconf>=2.3,<2.4",
    "antlr4-python3-runtime": "antlr4-python3-runtime==4.9.3",
    "pytorch-metric-learning": "pytorch-metric-learning>=2.3",
}
SOURCE_ONLY = {"antlr4-python3-runtime"}  # no wheel on PyPI: pip builds one from the source archive
FAISS = "faiss-cpu>=1.7.4"
MANYLINUX = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def pinned(name: str) -> str:
    """``name==<installed version>`` when this environment has it (the versions the suite ran), else its range."""
    try:
        return f"{name}=={md.version(name)}"
    except md.PackageNotFoundError:
        return PURE[name]


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def download(folder: Path, python_version: str, platforms: list[str], faiss: bool) -> None:
    target = ["--python-version", python_version, "--implementation", "cp"]
    for plat in platforms:
        target += ["--platform", plat]
    wheels = [pinned(n) for n in PURE if n not in SOURCE_ONLY]
    pip("download", "--no-deps", "--only-binary=:all:", *target, "-d", str(folder), *wheels)
    for name in SOURCE_ONLY:  # a pure-Python source archive: its wheel (py3-none-any) fits every Python 3
        pip("wheel", "--no-deps", "-w", str(folder), pinned(name))
    if faiss:
        pip("download", "--no-deps", "--only-binary=:all:", *target, "-d", str(folder), FAISS)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def wheel_from_installed(name: str, folder: Path) -> Path:
    """A py3-none-any wheel of the installed pure-Python distribution ``name`` (its files as installed)."""
    dist = md.distribution(name)
    meta = dist.metadata
    wheel_name = re.sub(r"[-_.]+", "_", meta["Name"]).lower()
    version = dist.version
    info = f"{wheel_name}-{version}.dist-info"
    out = folder / f"{wheel_name}-{version}-py3-none-any.whl"
    records = []
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel in dist.files or []:
            parts = Path(str(rel)).parts
            if parts[0] == ".." or "__pycache__" in parts or str(rel).endswith(".pyc"):
                continue  # console scripts outside site-packages, byte code
            if parts[0].endswith(".dist-info"):
                if parts[-1] in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json", "WHEEL"):
                    continue
                arc = "/".join((info, *parts[1:]))
            else:
                arc = "/".join(parts)
            data = Path(dist.locate_file(rel)).read_bytes()
            zf.writestr(arc, data)
            records.append((arc, _record_hash(data), str(len(data))))
        wheel = (f"Wheel-Version: 1.0\nGenerator: dml-runner scripts/wheelhouse.py\nRoot-Is-Purelib: true\n"
                 f"Tag: py3-none-any\n").encode()
        zf.writestr(f"{info}/WHEEL", wheel)
        records.append((f"{info}/WHEEL", _record_hash(wheel), str(len(wheel))))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerows(records)
        writer.writerow((f"{info}/RECORD", "", ""))
        zf.writestr(f"{info}/RECORD", buf.getvalue())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="where the wheels go (created; git ignores wheelhouse/)")
    p.add_argument("--python-version", default="3.12", help="the node's Python (default 3.12)")
    p.add_argument("--platform", action="append", help=f"pip platform tags (default {', '.join(MANYLINUX)})")
    p.add_argument("--faiss", action="store_true", help="add faiss-cpu (about 30 MB)")
    p.add_argument("--from-installed", action="store_true",
                   help="no network: pack this environment's installed copies of the pure-Python packages")
    a = p.parse_args(argv)
    folder = Path(a.folder)
    folder.mkdir(parents=True, exist_ok=True)
    if a.from_installed:
        if a.faiss:
            p.error("--from-installed packs pure-Python packages only; faiss needs --faiss without it")
        for name in PURE:
            print(wheel_from_installed(name, folder))
    else:
        download(folder, a.python_version, a.platform or list(MANYLINUX), a.faiss)
    total = sum(f.stat().st_size for f in folder.glob("*.whl"))
    print(f"{folder}: {len(list(folder.glob('*.whl')))} wheels, {total / 2**20:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
