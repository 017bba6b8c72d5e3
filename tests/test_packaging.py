"""An installed (non-editable) dml-runner must find its config tree from any directory."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_ships_the_config_tree_and_reference_data(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("dml_runner-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    repo_yaml = {str(p.relative_to(REPO)) for p in (REPO / "conf").rglob("*.yaml")}
    assert {f"dml_runner/{n}" for n in repo_yaml} <= names
    assert any(n.startswith("dml_runner/reference/") and n.endswith(".csv") for n in names)


def test_conf_dir_prefers_the_packaged_tree(tmp_path, monkeypatch):
    import dml_runner.config as config

    pkg = tmp_path / "site" / "dml_runner"
    (pkg / "conf").mkdir(parents=True)
    (pkg / "conf" / "config.yaml").write_text("defaults: []\n")
    monkeypatch.setattr(config, "__file__", str(pkg / "config.py"))
    assert config.conf_dir() == pkg / "conf"
    (pkg / "conf" / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="reinstall"):
        config.conf_dir()


def test_every_console_script_is_a_callable_main():
    import importlib
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"dml-run", "dml-eval", "dml-report", "dml-embed", "dml-search", "dml-export"} <= set(scripts)
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name


def test_the_engine_never_imports_a_command():
    """dml_runner/cli/ holds the commands; nothing else in the package imports from it (__main__.py is the
    `python -m dml_runner` command itself)."""
    import ast

    offenders = []
    for path in sorted((REPO / "dml_runner").rglob("*.py")):
        rel = path.relative_to(REPO / "dml_runner")
        if rel.parts[0] == "cli" or rel == Path("__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{rel}: {n}" for n in names if n == "dml_runner.cli" or n.startswith("dml_runner.cli.")]
    assert not offenders
