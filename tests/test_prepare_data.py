"""scripts/prepare_data.py on fixture trees: sources, missing files, counts, unreadable images."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from datasets_fixtures import MAKERS, make_cub200, make_inshop
from dml_runner.datasets import cub200

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prepare_data.py"


@pytest.fixture(scope="module")
def prepare():
    spec = importlib.util.spec_from_file_location("prepare_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sources_lists_every_dataset(prepare, capsys):
    assert prepare.main(["--sources"]) == 0
    out = capsys.readouterr().out
    for name in ("cub200", "cars196", "sop", "inshop", "vehicleid", "folder"):
        assert f"dml-run dataset={name}" in out
    assert "cars_annos.mat" in out and "list_eval_partition.txt" in out and "test_list_800.txt" in out


def test_usage_error(prepare):
    assert prepare.main(["cub200"]) == 2


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_fixture_trees_parse_but_counts_differ(prepare, tmp_path, capsys, name):
    root = MAKERS[name](tmp_path)
    code = prepare.main([name, str(root)])
    out = capsys.readouterr().out
    assert "images present and decodable" in out
    if name == "folder":  # no official counts to compare with
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
    assert "1 image(s) missing" in capsys.readouterr().out  # --quick only checks existence


def test_runs_as_a_script(tmp_path):
    root = make_cub200(tmp_path)
    result = subprocess.run([sys.executable, str(SCRIPT), "cub200", str(root), "--quick"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and "train_images" in result.stdout
