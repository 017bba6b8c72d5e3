"""dml-embed on a tiny trained digits run: image folders, dataset splits, and the errors a user meets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from use_helpers import oracle_embeddings, run_command, trained_run, write_digit_images


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory.getbasetemp(), "use_digits_run")


@pytest.mark.slow  # the installed command in a subprocess
def test_embed_image_folder(digits_run, tmp_path):
    folder = tmp_path / "my images"
    files = write_digit_images(folder)
    loose = folder / "unsorted.png"
    Image.open(files[-1]).save(loose)
    out = tmp_path / "embeddings.npz"
    proc = run_command("dml-embed", [digits_run, folder, "--out", out], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "7 images" in proc.stdout and str(out) in proc.stdout
    data = np.load(out)
    expected = sorted(str(f.resolve()) for f in [*files, loose])
    assert data["paths"].tolist() == expected
    names = [Path(p).parent.name if Path(p).parent != folder.resolve() else "" for p in expected]
    assert data["class_names"].tolist() == names
    labels = data["labels"]
    assert labels[names.index("")] == -1 and sorted(set(labels.tolist())) == [-1, 0, 1, 2]
    for name in ("digit_1", "digit_3", "digit_7"):  # one label per class name, numbered in sorted name order
        assert set(labels[np.array(names) == name]) == {["digit_1", "digit_3", "digit_7"].index(name)}
    want = oracle_embeddings(digits_run, [Path(p) for p in expected])
    assert data["embeddings"].dtype == np.float32 and data["embeddings"].shape == want.shape
    np.testing.assert_allclose(data["embeddings"], want, atol=1e-5)


def test_embed_test_split_reproduces_the_runs_embeddings(digits_run, tmp_path):
    from dml_runner.cli.embed import main

    out = tmp_path / "test.npz"
    assert main([str(digits_run), "test", "--out", str(out)]) == 0
    data, own = np.load(out), np.load(digits_run / "embeddings.npz")
    assert np.array_equal(data["labels"], own["labels"])
    np.testing.assert_allclose(data["embeddings"], own["embeddings"], atol=1e-5)
    assert all(p.startswith("sklearn.datasets.load_digits#") for p in data["paths"])
    # the run's own file names its items the same way
    assert np.array_equal(own["paths"], data["paths"]) and np.array_equal(own["class_names"], data["class_names"])
    assert data["class_names"].tolist() == [str(c) for c in data["labels"]]
    assert str(data["checkpoint"]) == str(digits_run / "last.pt")
    # a checkpoint file instead of the run directory: the same model
    assert main([str(digits_run / "last.pt"), "test", "--out", str(tmp_path / "from_file.npz")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "from_file.npz")["embeddings"], data["embeddings"])


def test_embed_train_split_of_another_protocol_without_augmentation(digits_run, tmp_path):
    """Dataset overrides pick other items; the train split is read with the test transform (no random shift)."""
    import torch
    from sklearn.datasets import load_digits

    from dml_runner.cli.embed import main
    from use_helpers import oracle_model

    outs = [tmp_path / "a.npz", tmp_path / "b.npz"]
    for out in outs:
        assert main([str(digits_run), "train", "dataset.protocol=classes", "--out", str(out)]) == 0
    a, b = np.load(outs[0]), np.load(outs[1])
    assert set(a["labels"].tolist()) == {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(a["embeddings"], b["embeddings"])
    rows = np.array([int(p.split("#")[1]) for p in a["paths"][:5]])
    images = torch.from_numpy(load_digits().images[rows].astype(np.float32) / 16)[:, None]
    with torch.no_grad():
        np.testing.assert_allclose(a["embeddings"][:5], oracle_model(digits_run)(images).numpy(), atol=1e-5)
    # another dataset config by name: the group is composed from conf/dataset
    assert main([str(digits_run), "dataset=digits", "dataset.protocol=classes", "--out", str(outs[0])]) == 0
    assert set(np.load(outs[0])["labels"].tolist()) == {5, 6, 7, 8, 9}


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_embed_errors_name_the_path_and_the_fix(digits_run, tmp_path, capsys):
    from dml_runner.cli.embed import main

    no_checkpoint = tmp_path / "unfinished_run"
    no_checkpoint.mkdir()
    (no_checkpoint / "config.json").write_text((digits_run / "config.json").read_text())
    assert main([str(no_checkpoint), "test", "--out", str(tmp_path / "x.npz")]) == 2
    err = error_line(capsys)
    assert str(no_checkpoint) in err and "best.pt" in err and "trainer.save_checkpoints=true" in err

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    assert main([str(digits_run), str(empty), "--out", str(tmp_path / "x.npz")]) == 2
    err = error_line(capsys)
    assert str(empty) in err and "no image files" in err

    folder = tmp_path / "broken"
    write_digit_images(folder, per_class=1, classes=(2,))
    bad = folder / "digit_2" / "zz_truncated.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main([str(digits_run), str(folder), "--out", str(tmp_path / "x.npz")]) == 2
    err = error_line(capsys)
    assert str(bad) in err and "remove or replace that file" in err
    assert not (tmp_path / "x.npz").exists()

    assert main([str(digits_run), "tset", "--out", str(tmp_path / "x.npz")]) == 2
    assert "tset" in error_line(capsys)


def test_write_embeddings_records_the_dataset_items(tmp_path):
    from dml_runner.datasets.base import TensorLabelledDataset
    from dml_runner.rundir import write_embeddings

    import torch

    ds = TensorLabelledDataset(torch.zeros(3, 1, 2, 2), np.array([4, 9, 4]), paths=["a.png", "b.png", "c.png"],
                               class_names={4: "four"})
    emb = np.arange(6, dtype=np.float64).reshape(3, 2)
    out = write_embeddings(tmp_path / "e.npz", emb, ds.labels, ds, query_mask=np.array([1, 0, 1]),
                           gallery_mask=np.array([0, 1, 1]))
    data = np.load(out)  # allow_pickle=False: nothing pickled
    assert data["paths"].tolist() == ["a.png", "b.png", "c.png"]
    assert data["class_names"].tolist() == ["four", "9", "four"]
    assert data["embeddings"].dtype == np.float32 and np.array_equal(data["embeddings"], emb)
    assert data["query_mask"].tolist() == [True, False, True] and data["gallery_mask"].dtype == bool
    assert not list(tmp_path.glob("*.tmp*"))
    with pytest.raises(ValueError, match="labels differ"):
        write_embeddings(tmp_path / "f.npz", emb, np.array([4, 9, 5]), ds)


@pytest.mark.slow
@pytest.mark.parametrize("method", [
    # a BatchNorm joins the head
    ("loss=hdml_npair", "method=hdml", "sampler=npair", "trainer.batch_size=10"),
    # each learner's slice is normalised on its own
    ("method=divide_conquer", "method.num_clusters=2", "method.finetune_epochs=0"),
], ids=["hdml", "divide_conquer"])
def test_embed_rebuilds_what_the_method_changes_in_the_model(tmp_path_factory, method):
    from dml_runner.cli.embed import main
    from dml_runner.trained import load_trained

    run_dir = trained_run(tmp_path_factory.getbasetemp(), f"use_{method[1].split('=')[1]}_run", *method)
    out = tmp_path_factory.mktemp("emb") / "test.npz"
    assert main([str(run_dir), "test", "--out", str(out)]) == 0
    np.testing.assert_allclose(np.load(out)["embeddings"], np.load(run_dir / "embeddings.npz")["embeddings"],
                               atol=1e-5)
    head = load_trained(run_dir).model.head
    assert (head.slices is not None) == (method[0] == "method=divide_conquer")


def test_embed_on_an_absent_gpu_names_the_option(digits_run, tmp_path, capsys):
    import torch

    from dml_runner.cli.embed import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main([str(digits_run), "test", "--device", "cuda", "--out", str(tmp_path / "x.npz")]) == 2
    err = error_line(capsys)
    assert "--device=cuda" in err and "no CUDA device" in err


@pytest.mark.slow
def test_image_run_reads_files_as_its_test_split(tmp_path_factory):
    """A run on image files (dataset=folder, rrc_224): an image folder embeds each file exactly as the run's test
    split does (same test transform), and the class names agree."""
    from dml_runner.datasets.fixtures import make_folder
    from dml_runner.cli.embed import main

    base = tmp_path_factory.getbasetemp()
    tree = make_folder(tmp_path_factory.mktemp("tree"))
    run_dir = trained_run(base, "use_folder_run", "dataset=folder", f"dataset.root={tree}", "trainer.batch_size=6",
                          "sampler.samples_per_class=2")
    out = tmp_path_factory.mktemp("emb")
    assert main([str(run_dir), str(tree), "--out", str(out / "folder.npz")]) == 0
    assert main([str(run_dir), "test", "--out", str(out / "split.npz")]) == 0
    files, split = np.load(out / "folder.npz"), np.load(out / "split.npz")
    row = {p: i for i, p in enumerate(files["paths"])}
    rows = [row[str(Path(p).resolve())] for p in split["paths"]]
    assert len(rows) == len(split["paths"]) > 0 and split["embeddings"].shape[1] == files["embeddings"].shape[1]
    np.testing.assert_allclose(files["embeddings"][rows], split["embeddings"], atol=1e-5)
    assert files["class_names"][rows].tolist() == split["class_names"].tolist()
    np.testing.assert_allclose(split["embeddings"], np.load(run_dir / "embeddings.npz")["embeddings"], atol=1e-5)
