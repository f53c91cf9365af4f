"""`detrforge data ...`: sub-commands, --help, summaries on stdout, one-line errors (exit 2)."""

from __future__ import annotations

import argparse
import json

import pytest
from PIL import Image

from launch import data_cli
from pipeline.data.shards import load_shard_info


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="detrforge")
    data_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    "command, expected",
    [
        ("imagefolder-to-shards", "--shard-size"),
        ("coco-to-shards", "--annotations"),
        ("make-samples", "--seed"),
    ],
)
def test_every_subcommand_has_help(command, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(["data", command, "--help"])
    assert exit_info.value.code == 0 and expected in capsys.readouterr().out


def test_make_samples_options():
    args = _parse(["data", "make-samples", "out", "--size", "medium", "--seed", "3"])
    assert (args.out, args.size, args.seed, args.handler) == (
        "out",
        "medium",
        3,
        data_cli._cmd_make_samples,
    )
    with pytest.raises(SystemExit):
        _parse(["data", "make-samples", "out", "--size", "huge"])


def test_coco_to_shards_prints_summary(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 10)).save(tmp_path / "images" / "a.jpg")
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 10}, {"id": 2, "file_name": "b.jpg", "width": 5, "height": 5}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]}],
        "categories": [{"id": 1, "name": "x"}],
    }  # fmt: skip
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    argv = [
        "data",
        "coco-to-shards",
        "--images",
        str(tmp_path / "images"),
        "--annotations",
        str(tmp_path / "ann.json"),
    ]
    args = _parse([*argv, str(tmp_path / "out"), "--workers", "1", "--no-progress"])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "wrote 1 images in 1 shards" in out and "missing_image" in out and "b.jpg" in out
    assert load_shard_info(tmp_path / "out").num_samples == 1


def test_data_errors_are_one_line_and_exit_2(tmp_path, capsys):
    args = _parse(
        [
            "data",
            "imagefolder-to-shards",
            str(tmp_path / "missing"),
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert args.handler(args) == data_cli.EXIT_DATA_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a folder" in err and "Traceback" not in err
