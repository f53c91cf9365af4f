"""Learning curves from run folders' metrics logs: read, aggregated over seeds, written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.curves import (
    group_curves,
    mean_std,
    median_step_time,
    read_eval_points,
    write_curves,
)
from pipeline.run_folder import RunFolder


def _run(root: Path, name: str, lines: list[dict], tail: str = "") -> Path:
    folder = root / name
    path = RunFolder(folder).metrics_path
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + tail)
    return folder


def _eval(step: int, ap: float, ap50: float, prefix: str = "eval", **extra) -> dict:
    return {"step": step, "time": 0.0,
            "metrics": {f"{prefix}/AP": ap, f"{prefix}/AP50": ap50, f"{prefix}/APl": -1.0,
                        f"{prefix}/AR100": 0.9, **extra}}


def _train(step: int, seconds: float) -> dict:
    return {"step": step, "time": 0.0, "metrics": {"train/loss": 3.0, "train/step_time_s": seconds}}


def test_eval_points_keep_the_last_value_of_a_step_and_skip_cut_lines(tmp_path):
    run = _run(tmp_path, "r", [_train(10, 0.5), _eval(50, 0.1, 0.2), _eval(100, 0.2, 0.4),
                               _eval(100, 0.25, 0.45)],  # a resumed run evaluated 100 again
               tail='{"step": 150, "metrics": {"eval/AP": 0.9')  # cut by a kill
    points = read_eval_points(RunFolder(run).metrics_path)
    assert points["eval/AP"] == {50: 0.1, 100: 0.25}
    assert points["eval/AP50"] == {50: 0.2, 100: 0.45}
    assert "eval/APl" not in points  # COCO's -1: no large objects, not a point
    assert "eval/AR100" not in points and "train/loss" not in points


def test_group_curves_average_the_seeds_step_by_step(tmp_path):
    s0 = _run(tmp_path, "det_s0", [_train(10, 0.4), _train(20, 0.6), _train(30, 0.5),
                                   _eval(50, 0.10, 0.30), _eval(100, 0.20, 0.50),
                                   _eval(100, 0.15, 0.35, prefix="eval_raw")])
    s1 = _run(tmp_path, "det_s1", [_train(10, 0.7), _eval(50, 0.30, 0.50)])  # stopped early
    group = group_curves({"det_s0": s0, "det_s1": s1}, {"det_s0": 0, "det_s1": 1})
    assert group.seeds == [0, 1] and group.stages == ["det_s0", "det_s1"]
    ap = group.curves["eval/AP"]
    assert [(p.step, p.n) for p in ap] == [(50, 2), (100, 1)]
    assert ap[0].mean == pytest.approx(0.20) and ap[0].std == pytest.approx(0.1414214, abs=1e-6)
    assert (ap[1].mean, ap[1].std) == (pytest.approx(0.20), 0.0)
    assert [p.mean for p in group.curves["eval_raw/AP"]] == [pytest.approx(0.15)]
    assert list(group.curves) == ["eval/AP", "eval_raw/AP", "eval/AP50", "eval_raw/AP50"]
    assert group.step_time_s == pytest.approx((0.5 + 0.7) / 2)  # per-run medians, then mean


def test_missing_logs_give_empty_curves(tmp_path):
    group = group_curves({"a": tmp_path / "never_ran"}, {"a": None})
    assert group.curves == {} and group.step_time_s is None
    assert median_step_time(tmp_path / "nothing.jsonl") is None


def test_mean_std():
    assert mean_std([0.5]) == (0.5, 0.0)
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    with pytest.raises(ValueError):
        mean_std([])


def test_write_curves_writes_table_json_and_plot(tmp_path):
    runs = {name: _run(tmp_path, name, [_train(10, 0.4), _eval(50, ap, ap * 2),
                                        _eval(100, ap + 0.1, ap * 2 + 0.1)])
            for name, ap in (("dino_s0", 0.1), ("dino_s1", 0.2), ("deformable", 0.05))}
    groups = {"dino": group_curves({k: runs[k] for k in ("dino_s0", "dino_s1")},
                                   {"dino_s0": 0, "dino_s1": 1}),
              "deformable": group_curves({"deformable": runs["deformable"]}, {"deformable": None})}
    out = tmp_path / "pipe"
    written = write_curves(out, groups)
    assert [p.name for p in written] == ["curves.json", "curves.md", "curves.png"]
    table = (out / "curves.md").read_text()
    assert "### AP against steps" in table and "### AP50 against steps" in table
    assert "| step | dino (2 seeds) | deformable (1 run) |" in table
    assert "| 50 | 0.150 ± 0.071 | 0.050 |" in table
    assert "| 100 | 0.250 ± 0.071 | 0.150 |" in table
    assert "| dino | 0.400 |" in table  # wall time per step
    data = json.loads((out / "curves.json").read_text())
    assert data["groups"]["dino"]["curves"]["eval/AP"][1] == {
        "step": 100, "mean": pytest.approx(0.25), "std": pytest.approx(0.0707107, abs=1e-6),
        "n": 2}
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_evaluations_yet_writes_no_plot(tmp_path):
    groups = {"a": group_curves({"a": _run(tmp_path, "a", [_train(10, 0.3)])}, {"a": None})}
    written = write_curves(tmp_path / "pipe", groups)
    assert [p.name for p in written] == ["curves.json", "curves.md"]
    assert "Wall time per step" in (tmp_path / "pipe" / "curves.md").read_text()
