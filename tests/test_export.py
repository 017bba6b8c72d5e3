"""dml-export: the exported TorchScript / ONNX embedding model gives the run's embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from use_helpers import oracle_model, read_digit_images, run_command, trained_run, write_digit_images


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory.getbasetemp(), "use_digits_run")


def reload(path: Path, fmt: str, images: np.ndarray) -> np.ndarray:
    """Embeddings of ``images`` by the exported file, loaded with torch.jit / ONNX Runtime directly."""
    import torch

    if fmt == "torchscript":
        with torch.no_grad():
            return torch.jit.load(str(path))(torch.from_numpy(images)).numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_digits_run(digits_run, tmp_path, fmt):
    import torch

    files = write_digit_images(tmp_path / "check", per_class=2)
    out = tmp_path / f"model.{fmt}"
    proc = run_command("dml-export", [digits_run, "--format", fmt, "--out", out, "--images", tmp_path / "check"],
                       cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "max abs difference" in proc.stdout
    record = json.loads(out.with_name(out.name + ".json").read_text())
    assert record["input"]["shape"] == ["N", 1, 8, 8] and record["output"]["shape"] == ["N", 64]
    assert record["checked_images"] == len(files) and record["max_abs_diff"] <= 1e-4 and record["normalized"]
    # another batch size than the check's, on the images as a user reads them
    images = read_digit_images(files[:5])
    with torch.no_grad():
        want = oracle_model(digits_run)(images).numpy()
    got = reload(out, fmt, images.numpy())
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalised as the run evaluates


@pytest.mark.slow
def test_export_resnet18_run(tmp_path_factory):
    """The user's torchvision backbone (resnet18, random weights, 8 x 8 digits) exports and checks in both formats."""
    from dml_runner.trained import export, load_trained

    run_dir = trained_run(tmp_path_factory.getbasetemp(), "use_resnet18_run", "backbone=resnet18",
                          "backbone.embedding_dim=32", "trainer.batch_size=16", "trainer.max_steps_per_epoch=1")
    trained = load_trained(run_dir)
    assert type(trained.model.trunk).__name__ == "TorchvisionTrunk" and trained.model.trunk.arch == "resnet18"
    folder = tmp_path_factory.mktemp("check")
    files = write_digit_images(folder, per_class=1)
    images = read_digit_images(files).numpy()
    for fmt in ("torchscript", "onnx"):
        out = folder / f"resnet18.{fmt}"
        record = export(trained, fmt, out, [str(folder)])
        assert record["output"]["shape"] == ["N", 32] and record["max_abs_diff"] <= 1e-4
        want = json.loads((run_dir / "config.json").read_text())
        assert want["backbone"]["arch"] == "resnet18"
        import torch

        with torch.no_grad():
            reference = trained.model(torch.from_numpy(images)).numpy()
        np.testing.assert_allclose(reload(out, fmt, images), reference, atol=1e-4)


def test_compare_refuses_a_model_that_differs():
    from dml_runner import DMLRunnerError
    from dml_runner.trained import compare

    reference = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    assert compare(reference, reference + 1e-6, 1e-4, "m.onnx") <= 1e-4
    with pytest.raises(DMLRunnerError, match=r"m.onnx.*differ.*by 0.001.*--atol 0.0001"):
        compare(reference, reference + 1e-3, 1e-4, "m.onnx")
    with pytest.raises(DMLRunnerError, match="NaN|nan|differ"):
        compare(reference, reference * np.nan, 1e-4, "m.onnx")


def test_export_without_onnx_says_what_to_install(digits_run, tmp_path, capsys, monkeypatch):
    import importlib.util

    from dml_runner.cli.export import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert main([str(digits_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install dml-runner[onnx]" in err and "onnxruntime" in err
    assert not (tmp_path / "m.onnx").exists()


def test_export_of_a_run_without_checkpoint(tmp_path, capsys):
    from dml_runner.cli.export import main

    (tmp_path / "run").mkdir()
    assert main([str(tmp_path / "run"), "--format", "torchscript"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path / "run") in err and "no checkpoint" in err


@pytest.mark.parametrize("weights", [{"pretrained": True}, {"weights": "/elsewhere/googlenet.pth"}, {}])
def test_rebuilt_googlenet_rescales_its_input_as_trained(weights):
    """GoogLeNet built with ImageNet weights re-scales its input (a flag outside the state dict); the rebuilt model
    does the same without reading any weights file."""
    from dml_runner.trained import rebuild_model

    backbone = {"_target_": "dml_runner.backbones.torchvision_backbone", "arch": "googlenet", "pretrained": False,
                "weights": None, "embedding_dim": 8, **weights}
    model = rebuild_model({"backbone": backbone, "eval": {"normalize": False}}, in_channels=3)
    assert model.trunk.transform_input is bool(weights)
    assert model.info["weights"] == "random init"
