"""dml-embed, dml-export and dml-eval given the wrong thing: one line, the documented exit status."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from use_helpers import trained_run, write_digit_images


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory.getbasetemp(), "use_digits_run")


def test_embed_given_an_image_folder_as_the_run_says_what_it_needs(tmp_path, capsys):
    """Guards dml-embed IMAGES IMAGES (the run left out) answering "train it again": it says a run folder comes
    first and that it was given an image folder."""
    from dml_runner.cli.embed import main

    folder = tmp_path / "images"
    write_digit_images(folder, per_class=1)
    assert main([str(folder), str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not a run folder" in err and "image files" in err and "again" not in err


@pytest.mark.parametrize("command", ["export", "embed"])
def test_an_output_in_a_folder_that_cannot_be_written_is_one_line_and_exit_2(digits_run, tmp_path, capsys, command):
    """Guards `dml-export --out /proc/...` (a traceback and exit 1 before) and dml-embed's --out alike."""
    if command == "export":
        from dml_runner.cli.export import main

        args = [str(digits_run), "--format", "torchscript", "--out", "/proc/dml-x.pt"]
    else:
        from dml_runner.cli.embed import main

        folder = tmp_path / "images"
        write_digit_images(folder, per_class=1)
        args = [str(digits_run), str(folder), "--out", "/proc/dml-x.npz"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "/proc" in err and "cannot be written" in err


def test_eval_refuses_a_recall_k_that_reaches_the_whole_gallery(tmp_path, capsys):
    """Guards `--recall-at 100` on 12 items silently giving Recall@100 = 1.0: a K >= the items a query searches
    (leave-one-out: N - 1; query/gallery: the gallery) is refused in one line; K = N - 2 is accepted."""
    from dml_runner.cli.eval import main

    rng = np.random.default_rng(0)
    y = rng.integers(0, 8, 12)
    x = (rng.normal(size=(8, 5))[y] + 0.5 * rng.normal(size=(12, 5))).astype(np.float32)
    path = tmp_path / "emb.npz"
    np.savez(path, embeddings=x, labels=y % 3)
    for k in ("100", "11"):
        assert main([str(path), "--device", "cpu", "--recall-at", "1", k]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"dml-eval: error: --recall-at {k}:") and "searches 11 items" in err
    assert main([str(path), "--device", "cpu", "--recall-at", "1", "10"]) == 0
    gallery = np.arange(12) >= 4  # 8 gallery items, 4 queries outside it
    path = tmp_path / "qg.npz"
    np.savez(path, embeddings=x, labels=y % 3, query_mask=~gallery, gallery_mask=gallery)
    assert main([str(path), "--device", "cpu", "--recall-at", "8"]) == 2
    assert "searches 8 items" in capsys.readouterr().err
