"""dml-embed, dml-export and dml-eval given the wrong thing: one line, the documented exit status."""

from __future__ import annotations

from pathlib import Path

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
