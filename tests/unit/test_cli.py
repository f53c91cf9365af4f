"""The command line as a user meets it: --help everywhere, config show, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
TINY_DETR = ROOT / "configs" / "stages" / "detr_pretrain" / "tiny.yaml"


def all_command_paths(parser=None, prefix=()):
    """Every (sub)command path of the parser, e.g. ("registry", "promote")."""
    parser = parser or build_parser()
    paths = [prefix]
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                paths += all_command_paths(sub, (*prefix, name))
    return paths


@pytest.mark.parametrize("path", all_command_paths(), ids=lambda p: " ".join(p) or "detrforge")
def test_help_works_everywhere(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    assert "usage: detrforge" in capsys.readouterr().out


def test_the_commands_of_the_design_exist():
    paths = {" ".join(p) for p in all_command_paths()}
    for command in ("run", "submit", "status", "cancel", "data make-samples",
                    "data coco-to-shards", "data imagefolder-to-shards", "eval", "export",
                    "registry list", "registry promote", "ui", "config show"):
        assert command in paths


def test_config_show_prints_resolved_config(capsys):
    assert main(["config", "show", str(TINY_DETR), "train.max_steps=7", "optim.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "# stage: detr_pretrain" in out and "# config_hash: " in out
    assert "max_steps: 7" in out and "lr: 0.001" in out


def test_config_show_typo_names_key_file_and_fix(tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(f"base: {TINY_DETR}\ntrain:\n  max_stesp: 5\n")
    assert main(["config", "show", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "train.max_stesp" in err and "did you mean 'train.max_steps'" in err
    assert str(recipe) in err
    assert "Traceback" not in err


def test_unknown_stage_kind_suggests(tmp_path, capsys):
    recipe = tmp_path / "kind.yaml"
    recipe.write_text("stage: detr_pretrian\n")
    assert main(["config", "show", str(recipe)]) == 2
    assert "did you mean 'detr_pretrain'" in capsys.readouterr().err


def test_console_script_runs():
    exe = Path(sys.executable).parent / "detrforge"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "submit" in out.stdout
