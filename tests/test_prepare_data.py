"""dml-prepare on fixture trees: sources, missing files, counts, unreadable images; --download against a local
HTTP server on 127.0.0.1 (checksum, resume, extraction, datasets without a stable archive)."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from dml_runner import DMLRunnerError

from dml_runner.datasets import cub200
from dml_runner.datasets.fixtures import MAKERS, make_cub200, make_inshop
from dml_runner.datasets.prepare import download
from dml_runner.datasets.registry import SPECS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prepare_data.py"


@pytest.fixture(scope="module")
def prepare():
    """The dml-prepare command's module."""
    from dml_runner.cli import prepare as module

    return module


def test_sources_lists_every_dataset(prepare, capsys):
    assert prepare.main(["--sources"]) == 0
    out = capsys.readouterr().out
    for name, spec in SPECS.items():
        assert f"dml-run dataset={name}" in out and spec.title in out and spec.layout in out
    assert "cars_annos.mat" in out and "list_eval_partition.txt" in out and "test_list_800.txt" in out


def test_usage_error(prepare):
    assert prepare.main(["cub200"]) == 2


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_fixture_trees_parse_but_counts_differ(prepare, tmp_path, capsys, name):
    root = MAKERS[name](tmp_path)
    code = prepare.main([name, str(root)])
    out = capsys.readouterr().out
    assert "images present and decodable" in out
    if name in ("folder", "csv"):  # your own images: no official counts to compare with
        assert code == 0 and "OK: complete" in out
    else:
        assert code == 1 and "DIFFERS (official" in out


def test_complete_tree_passes(prepare, tmp_path, capsys, monkeypatch):
    root = make_cub200(tmp_path)
    monkeypatch.setattr(cub200, "OFFICIAL_COUNTS", {"train_images": 9, "train_classes": 3, "test_images": 9,
                                                    "test_classes": 3})
    assert prepare.main(["cub200", str(root)]) == 0
    assert "OK: complete official tree" in capsys.readouterr().out


def test_missing_split_file_and_root(prepare, tmp_path, capsys):
    root = make_inshop(tmp_path)
    (root / "Eval" / "list_eval_partition.txt").unlink()
    assert prepare.main(["inshop", str(root)]) == 1
    out = capsys.readouterr().out
    assert "list_eval_partition.txt does not exist" in out and "mmlab.ie.cuhk.edu.hk" in out
    assert prepare.main(["sop", str(tmp_path / "nowhere")]) == 1
    assert "nowhere does not exist" in capsys.readouterr().out


def test_unreadable_and_missing_images_are_listed(prepare, tmp_path, capsys):
    root = make_cub200(tmp_path)
    images = sorted((root / "images").rglob("*.jpg"))
    images[0].unlink()
    images[1].write_bytes(b"broken")
    assert prepare.main(["cub200", str(root)]) == 1
    out = capsys.readouterr().out
    assert "2 image(s) missing or unreadable" in out and images[0].name in out and images[1].name in out
    assert prepare.main(["cub200", str(root), "--quick"]) == 1
    assert "2 image(s) missing or cut short" in capsys.readouterr().out  # --quick: existence and end markers


def dml_prepare_cmd() -> list[str]:
    script = Path(sys.executable).with_name("dml-prepare")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dml_runner.cli.prepare"]


def test_runs_as_a_command_from_any_directory_and_as_the_old_script(tmp_path):
    root = make_cub200(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([*dml_prepare_cmd(), "cub200", str(root), "--quick"], capture_output=True, text=True,
                            timeout=120, cwd=elsewhere)
    assert result.returncode == 1 and "train_images" in result.stdout
    result = subprocess.run([sys.executable, str(SCRIPT), "cub200", str(root), "--quick"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and "train_images" in result.stdout


# --- --download against a local server -------------------------------------------------------------------------


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves one in-memory archive with HTTP Range support; records the Range headers it received."""

    payload = b""
    ranges: list = []
    cut_after: int | None = None  # send only this many bytes once (a dropped connection)

    def do_GET(self):  # noqa: N802 - http.server's name
        start = 0
        header = self.headers.get("Range")
        type(self).ranges.append(header)
        if header:
            start = int(header.split("=")[1].split("-")[0])
        body = self.payload[start:]
        self.send_response(206 if header else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if type(self).cut_after is not None:
            body, type(self).cut_after = body[:type(self).cut_after], None
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def archive_server(tmp_path):
    """(serve(payload) -> url, handler class): a server on 127.0.0.1 only, stopped after the test."""
    handler = type("Handler", (_RangeHandler,), {"ranges": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def serve(payload: bytes, name: str = "CUB_200_2011.tgz") -> str:
        handler.payload = payload
        return f"http://127.0.0.1:{server.server_address[1]}/{name}"

    yield serve, handler
    server.shutdown()
    server.server_close()


def _cub_archive(tmp_path) -> bytes:
    src = tmp_path / "src"
    root = make_cub200(src)
    out = tmp_path / "CUB_200_2011.tgz"
    with tarfile.open(out, "w:gz") as tf:
        tf.add(root, arcname="CUB_200_2011")
    shutil.rmtree(src)
    return out.read_bytes()


def test_download_verifies_extracts_and_checks(prepare, tmp_path, archive_server, capsys):
    serve, handler = archive_server
    payload = _cub_archive(tmp_path)
    url = serve(payload)
    root = tmp_path / "data" / "CUB_200_2011"
    code = prepare.main(["cub200", str(root), "--download", "--url", url, "--md5", hashlib.md5(payload).hexdigest()])
    out = capsys.readouterr().out
    assert (root / "images.txt").is_file() and (root / "images").is_dir()
    assert not (tmp_path / "data" / "CUB_200_2011.tgz").exists()  # the archive is removed once extracted
    assert "images present and decodable" in out and "DIFFERS (official" in out  # fixture counts, checked
    assert code == 1  # a fixture is not the full official tree
    assert handler.ranges == [None]


def test_download_resumes_a_partial_file(tmp_path, archive_server):
    serve, handler = archive_server
    payload = _cub_archive(tmp_path)
    url = serve(payload)
    root = tmp_path / "data" / "CUB_200_2011"
    handler.cut_after = len(payload) // 3  # the first connection drops a third of the way in
    md5 = hashlib.md5(payload).hexdigest()
    part = tmp_path / "data" / "CUB_200_2011.tgz.part"
    with pytest.raises(DMLRunnerError, match="run the same command again to resume"):
        download("cub200", root, url, md5)
    assert part.stat().st_size == len(payload) // 3 and not root.exists()
    download("cub200", root, url, md5)  # the same command again
    assert handler.ranges == [None, f"bytes={len(payload) // 3}-"]
    assert (root / "image_class_labels.txt").is_file() and not part.exists()


def test_download_refuses_a_wrong_checksum_and_keeps_nothing_broken(prepare, tmp_path, archive_server, capsys):
    serve, _ = archive_server
    url = serve(_cub_archive(tmp_path))
    root = tmp_path / "data" / "CUB_200_2011"
    assert prepare.main(["cub200", str(root), "--download", "--url", url, "--md5", "0" * 32]) == 1
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "expected 00000000" in err and len(err.strip().splitlines()) == 1
    assert not root.exists() and not list((tmp_path / "data").glob("*.part"))


def test_download_refuses_members_outside_the_target(prepare, tmp_path, archive_server, capsys):
    serve, _ = archive_server
    evil = tmp_path / "evil.tgz"
    (tmp_path / "x.txt").write_text("x")
    with tarfile.open(evil, "w:gz") as tf:
        tf.add(tmp_path / "x.txt", arcname="../escaped.txt")
    payload = evil.read_bytes()
    url = serve(payload)
    root = tmp_path / "data" / "CUB_200_2011"
    assert prepare.main(["cub200", str(root), "--download", "--url", url, "--md5",
                         hashlib.md5(payload).hexdigest()]) == 1
    assert "outside" in capsys.readouterr().err and not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize("name", sorted(n for n, spec in SPECS.items() if spec.archive is None and not spec.own_images))
def test_download_without_a_stable_archive_says_where_to_get_it(prepare, tmp_path, capsys, name):
    assert prepare.main([name, str(tmp_path / "d"), "--download"]) == 1
    err = capsys.readouterr().err
    assert "no stable public archive" in err and "http" in err and f"dml-prepare {name}" in err


def test_url_without_download_is_a_usage_error(prepare, tmp_path):
    assert prepare.main(["cub200", str(tmp_path), "--url", "http://127.0.0.1:1/x"]) == 2


def test_sources_say_how_to_get_each_dataset(prepare, capsys):
    prepare.main(["--sources"])
    out = capsys.readouterr().out
    assert "dml-prepare cub200 <dir>/CUB_200_2011 --download" in out and "bring your own" not in out
