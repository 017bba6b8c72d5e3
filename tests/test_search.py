"""dml-search on a tiny trained digits run: printed neighbours, distances and the retrieval grid PNG."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from use_helpers import oracle_embeddings, run_command, trained_run, write_digit_images


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory.getbasetemp(), "use_digits_run")


@pytest.fixture
def indexed(digits_run, tmp_path):
    """An image folder, a query outside it, and its index made by dml-embed."""
    from dml_runner.cli.embed import main

    folder = tmp_path / "gallery"
    files = write_digit_images(folder, per_class=3)
    stranger = tmp_path / "queries" / "new.png"
    stranger.parent.mkdir()
    Image.open(files[4]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(stranger)
    index = tmp_path / "index.npz"
    assert main([str(digits_run), str(folder), "--out", str(index)]) == 0
    return folder, files, stranger, index


@pytest.mark.slow  # the installed command in a subprocess
def test_search_prints_neighbours_and_draws_the_grid(digits_run, indexed, tmp_path):
    from dml_runner.plots import GRID_COLOURS, retrieval_grid_cell, retrieval_grid_size

    folder, files, stranger, index = indexed
    k = 4
    grid = tmp_path / "grid.png"
    proc = run_command("dml-search", [digits_run, files[0], stranger, "--index", index, "--k", k, "--out", grid],
                       cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # brute force on the oracle's embeddings of the queries and of the index
    data = np.load(index)
    gallery = data["embeddings"].astype(np.float64)
    queries = oracle_embeddings(digits_run, [files[0], stranger]).astype(np.float64)
    dist = np.sqrt(((queries[:, None, :] - gallery[None, :, :]) ** 2).sum(-1))
    blocks = proc.stdout.split("query ")[1:]
    assert [b.splitlines()[0] for b in blocks] == [str(files[0]), str(stranger)]
    for q, block in enumerate(blocks):
        rows = [re.match(r"\s+(\d+)\s+([\d.]+)\s+(\S+)", line) for line in block.splitlines()[1:k + 1]]
        assert [int(r.group(1)) for r in rows] == list(range(1, k + 1))
        printed = np.array([float(r.group(2)) for r in rows])
        order = np.argsort(dist[q], kind="stable")[:k]
        assert [r.group(3) for r in rows] == [data["paths"][j] for j in order]
        np.testing.assert_allclose(printed, dist[q, order], atol=2e-4)
    assert blocks[0].splitlines()[1].split()[2] == str(files[0].resolve())  # a query in the index finds itself first
    # the grid: two rows of query + k neighbours; the first query's class is known (green/red frames), the
    # stranger's is not (grey frames)
    with Image.open(grid) as image:
        assert image.size == retrieval_grid_size(2, k)
        pixels = np.asarray(image.convert("RGB"))
    x, y = retrieval_grid_cell(0, 1)
    assert tuple(pixels[y + 1, x + 1]) == GRID_COLOURS["hit"]
    for column in range(1, k + 1):
        x, y = retrieval_grid_cell(1, column)
        assert tuple(pixels[y + 1, x + 1]) == GRID_COLOURS["unknown"]


def test_search_errors(digits_run, indexed, tmp_path, capsys):
    from dml_runner.cli.search import main

    folder, files, stranger, index = indexed
    bare = tmp_path / "bare.npz"
    np.savez(bare, embeddings=np.zeros((3, 64), np.float32), labels=np.arange(3))
    assert main([str(digits_run), str(stranger), "--index", str(bare)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(bare) in err and "dml-embed" in err
    assert main([str(digits_run), str(tmp_path / "missing.png"), "--index", str(index)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "missing.png" in err
    assert main([str(digits_run), str(stranger), "--index", str(index), "--k", "0"]) == 2
    assert "--k 0" in capsys.readouterr().err


def test_an_index_embedded_by_another_model_is_refused(digits_run, indexed, tmp_path, capsys):
    """Guards dml-search against an index of the same dimension embedded by a different model (meaningless
    neighbours, exit 0 before): embeddings files record the model's fingerprint, a mismatch is refused in one line,
    and a file without one is searched with a warning."""
    import torch

    from dml_runner.cli.search import main
    from dml_runner.rundir import model_fingerprint, write_embeddings
    from dml_runner.trained import load_trained, scan_images

    folder, files, stranger, index = indexed
    trained = load_trained(digits_run)
    ours = model_fingerprint(trained.model, trained.config)
    assert str(np.load(index)["fingerprint"]) == ours
    # the run's own file records the same fingerprint for the same weights (trainer=smoke: no validation split, so
    # the final epoch is last.pt, the checkpoint dml-search loads)
    assert not (digits_run / "best.pt").exists()
    assert str(np.load(digits_run / "embeddings.npz")["fingerprint"]) == ours

    other = load_trained(digits_run)
    with torch.no_grad():
        next(other.model.parameters()).add_(1e-3)  # another model, same architecture and dimension
    paths, labels, names = scan_images(folder)
    dataset = other.image_dataset(paths, labels, names)
    foreign = tmp_path / "foreign.npz"
    write_embeddings(foreign, other.embed(dataset), dataset.labels, dataset,
                     fingerprint=model_fingerprint(other.model, other.config))
    assert main([str(digits_run), str(stranger), "--index", str(foreign), "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "embedded by another model" in err and "dml-embed" in err

    with np.load(index) as data:
        arrays = {k: data[k] for k in data.files if k != "fingerprint"}
    unmarked = tmp_path / "unmarked.npz"
    np.savez(unmarked, **arrays)
    assert main([str(digits_run), str(stranger), "--index", str(unmarked), "--out", str(tmp_path / "g.png")]) == 0
    assert "no model fingerprint" in capsys.readouterr().err
