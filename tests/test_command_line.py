"""dml-run's command line through its real entry point, in process: mistakes get one line, clear intents run."""

from __future__ import annotations

import sys

import pytest

from dml_runner.cli import run as cli_run

# Each mistake: the arguments, then words its one line must hold. A catalogue of the kinds a user types: misspelt
# keys, groups and options, values of the wrong type, unreadable overrides, output folders that cannot be written.
MISTAKES = [
    (["trainer.epoch=3"], ["trainer.epoch=3", "did you mean trainer.epochs?"]),
    (["los=triplet"], ["los=triplet", "did you mean loss?"]),
    (["schedular=cosine"], ["did you mean scheduler?"]),
    (["trainer.epochs=abc"], ["trainer.epochs=abc", "Integer"]),
    (["trainer.batch_size=1.5"], ["trainer.batch_size=1.5", "Integer"]),
    (["trainer.deterministic=maybe"], ["trainer.deterministic=maybe", "not a valid bool"]),
    (["logger.wandb.projct=x"], ["logger=wandb is not selected", "did you mean logger.wandb.project?"]),
    (["loss=tripet"], ["loss=tripet", "did you mean loss=triplet?"]),
    (["optimizer=adamm"], ["did you mean optimizer=adam?"]),
    (["backbone=resnet5"], ["backbone=resnet5", "did you mean backbone=resnet50?"]),
    (["logger=[csv,mlfow]"], ["did you mean logger=mlflow?"]),
    (["eval.recal_at=[1]"], ["did you mean eval.recall_at?"]),
    (["optimizer.lrr=0.1"], ["did you mean optimizer.lr?"]),
    (["trainer.epochs.max=3"], ["trainer.epochs is a value"]),
    (["dataset.root=a'b"], ["dataset.root=a'b", "not a valid override", "quote"]),
    (["-m", "trainer.seed=0,1", "sampler=class_balance"], ["did you mean sampler=class_balanced?"]),
    (["-m", "loss=triplet,contrastiv"], ["did you mean loss=contrastive?"]),
    (["trainer.epochs=-3"], ["trainer.epochs=-3"]),  # composes; the config check refuses it
    (["hydra.run.dir=/proc/dml-x"], ["hydra.run.dir", "/proc", "cannot be written"]),
    (["paths.output_dir={file}/sub"], ["paths.output_dir", "is a file, not a folder"]),
]


def run_main(monkeypatch, capsys, args):
    monkeypatch.setattr(sys, "argv", ["dml-run", *args])
    with pytest.raises(SystemExit) as stop:
        cli_run.main()
    return stop.value.code, capsys.readouterr()


@pytest.mark.parametrize("args,words", MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_each_mistake_gets_one_line_and_leaves_no_run_folder(monkeypatch, capsys, tmp_path, args, words):
    """Guards the one-line promise for mistakes Hydra itself reports in many lines (a plain misspelt key gets its
    "add +" advice, a bad value a traceback, an unreadable override a lexer error) and for output folders that
    cannot be written (a raw traceback before); also that a refused command leaves no run folder behind."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = tmp_path / "out"
    args = [a.replace("{file}", str(a_file)) for a in args]
    if not any(a.startswith("paths.output_dir=") for a in args):
        args.append(f"paths.output_dir={out}")
    code, captured = run_main(monkeypatch, capsys, ["trainer=smoke", *args])
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("dml-run: error: "), captured.err
    for word in words:
        assert word in lines[0]
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*")), list(out.rglob("*"))


def test_clear_intents_are_accepted():
    """Guards `logger=null` (once a 25-line traceback) meaning no tracker, and `key=~/path` (once a lexer error)
    meaning the home-relative path."""
    import os

    assert cli_run.prepare_arguments(["logger=null", "dataset.root=~/data", "trainer.epochs=3", "-m"]) == \
        ["logger=[]", f"dataset.root={os.path.expanduser('~/data')}", "trainer.epochs=3", "-m"]
    cli_run.check_command_line(cli_run.prepare_arguments(["logger=null"]))
    cli = cli_run._compose(cli_run.prepare_arguments(["logger=null"]), with_hydra=False)
    assert not cli.get("logger")


def test_logger_null_runs_without_a_tracker(monkeypatch, capsys, tmp_path):
    """Guards the path a user types: `dml-run logger=null` trains (history.csv only) and exits 0."""
    monkeypatch.setattr(sys, "argv", ["dml-run", "trainer=smoke", "logger=null", f"hydra.run.dir={tmp_path / 'r'}"])
    cli_run.main()
    assert (tmp_path / "r" / "results.json").is_file() and not (tmp_path / "r" / "mlruns").exists()


def test_presets_are_shown_in_help_and_named_at_start():
    """Guards presets applying silently: --help showed 30 epochs and batch 64 with no word that digits runs 10 and
    20; the settings each preset makes are listed, less those the command line set."""
    text = cli_run.format_help()
    assert "trainer.epochs=10" in text and "preset_trainer/digits_default" in text
    assert "trainer.batch_size=20" in text
    applied = dict(cli_run.preset_settings({"preset": "digits", "preset_trainer": "digits_default",
                                            "preset_sampler": None}, ["trainer.batch_size=32"]))
    assert applied["preset_trainer/digits_default"] == {"trainer.epochs": 10}
    assert "trainer.batch_size" not in applied["preset/digits"] and applied["preset/digits"]["optimizer.lr"] == 3e-4


def test_the_results_header_says_whether_test_classes_were_seen():
    """Guards the header saying "unseen classes" under protocol=images, where every test class is trained on."""
    from dml_runner.run import format_results_table

    def results(protocol):
        return {"metrics": {"recall@1": 0.5}, "final_epoch": 1, "best": None, "device": "cpu", "wall_time_s": 1.0,
                "dataset": {"name": "digits", "test_images": 9, "test_classes": 3, "info": {"protocol": protocol}}}

    assert "3 classes seen in training" in format_results_table(results("images"))
    assert "3 unseen classes" in format_results_table(results("classes"))


def test_the_divide_and_conquer_example_states_the_length_digits_runs(compose_cfg):
    """Guards docs/DIVIDE_CONQUER.md's first example against stating another run length than the presets give
    (it said 30 epochs where digits runs 10)."""
    import re

    from conftest import REPO

    line = next(ln for ln in (REPO / "docs" / "DIVIDE_CONQUER.md").read_text().splitlines()
                if ln.startswith("dml-run method=divide_conquer loss=margin ") and "digits" in ln)
    k, epochs, conquer = map(int, re.search(r"K = (\d+), (\d+) epochs \(the last (\d+) conquer\)", line).groups())
    cfg = compose_cfg("method=divide_conquer", "loss=margin")
    assert (k, epochs, conquer) == (cfg.method.num_clusters, cfg.trainer.epochs, cfg.method.finetune_epochs)


def test_sweeps_only_a_sweeper_can_draw_are_left_to_it():
    """Guards the command-line check against refusing sweeps it cannot enumerate (Optuna's interval(...), glob(...)):
    they compose without that override and the sweeper draws them."""
    for args in (["-m", "hparams_search=optuna", "optimizer.lr=tag(log,interval(1e-5,1e-2))"],
                 ["-m", "loss=glob(*)"], ["-m", "trainer.seed=range(0,3)"]):
        assert cli_run.check_command_line(args) is not None
