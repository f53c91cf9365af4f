"""`seeds:` in a pipeline file: one stage instance per seed, and the summary's mean ± std."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.graph import load_pipeline
from launch.runner import print_summary, select_stages, show_status
from launch.summary import seed_rows, write_summary
from pipeline.config import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DETR = CONFIGS / "stages" / "detr_pretrain" / "tiny.yaml"
CONVERGENCE = CONFIGS / "pipelines" / "convergence.yaml"


def _pipe(tmp_path: Path, stages: str) -> Path:
    path = tmp_path / "pipe.yaml"
    path.write_text(f"name: pipe\nstages:\n{stages}")
    return path


def _stage(name: str, extra: str = "") -> str:
    return f"  - name: {name}\n    recipe: {DETR}\n{extra}"


def test_seeds_expand_into_named_instances_with_their_seed(tmp_path):
    pipe = _pipe(tmp_path, _stage("det", "    overrides: [train.seed=7, train.max_steps=9]\n"
                                         "    seeds: [3, 0]\n") + _stage("plain"))
    pipeline = load_pipeline(pipe)
    assert [s.name for s in pipeline.stages] == ["det_s3", "det_s0", "plain"]
    det3, det0, plain = pipeline.stages
    # the seed wins over the entry's own train.seed; the other overrides are kept
    assert (det3.cfg.train.seed, det0.cfg.train.seed) == (3, 0)
    assert det3.cfg.train.max_steps == det0.cfg.train.max_steps == 9
    assert (det3.group, det3.seed, plain.group, plain.seed) == ("det", 3, "plain", None)
    assert det3.config_hash != det0.config_hash  # separate run folders and caches
    assert pipeline.run_dir(tmp_path, det3.name) != pipeline.run_dir(tmp_path, det0.name)
    assert list(pipeline.groups()) == ["det", "plain"]
    assert [s.name for s in pipeline.groups()["det"]] == ["det_s3", "det_s0"]


def test_only_and_from_accept_the_seeded_name_or_one_instance(tmp_path):
    pipeline = load_pipeline(_pipe(tmp_path, _stage("a") + _stage("det", "    seeds: [0, 1]\n")
                                   + _stage("b")))
    assert [s.name for s in select_stages(pipeline, "det", None)] == ["det_s0", "det_s1"]
    assert [s.name for s in select_stages(pipeline, "det_s1", None)] == ["det_s1"]
    assert [s.name for s in select_stages(pipeline, None, "det")] == ["det_s0", "det_s1", "b"]


@pytest.mark.parametrize("seeds", ["[]", "[0, 0]", "[-1]", "zero", "[0.5]", "[true]"])
def test_bad_seed_lists_are_refused_naming_the_stage(tmp_path, seeds):
    pipe = _pipe(tmp_path, _stage("det", f"    seeds: {seeds}\n"))
    with pytest.raises(ConfigError, match=r"stages\[0\] \('det'\): seeds must be"):
        load_pipeline(pipe)


def test_a_dependant_names_one_instance_not_the_seeded_stage(tmp_path):
    backbone = CONFIGS / "stages" / "backbone_pretrain" / "tiny.yaml"
    first = f"  - name: bb\n    recipe: {backbone}\n    seeds: [0, 1]\n"
    bad = _stage("det", "    overrides: [backbone_init=stage:bb]\n")
    with pytest.raises(ConfigError, match=r"stage:bb is a seeded stage; .*bb_s0, bb_s1"):
        load_pipeline(_pipe(tmp_path, first + bad))
    good = _stage("det", "    overrides: [backbone_init=stage:bb_s1]\n")
    assert load_pipeline(_pipe(tmp_path, first + good)).stage("det").depends_on == ["bb_s1"]


def test_an_instance_name_may_not_collide_with_another_stage(tmp_path):
    pipe = _pipe(tmp_path, _stage("det_s0") + _stage("det", "    seeds: [0]\n"))
    with pytest.raises(ConfigError, match="two stages are named 'det_s0'"):
        load_pipeline(pipe)


def test_the_convergence_pipeline_runs_each_variant_with_two_seeds():
    pipeline = load_pipeline(CONVERGENCE)
    groups = pipeline.groups()
    assert set(groups) == {"backbone", "deformable", "dino", "dino_varifocal", "dino_groups"}
    detectors = {name: specs for name, specs in groups.items() if name != "backbone"}
    deformable_steps = detectors["deformable"][0].cfg.train.max_steps
    for name, specs in detectors.items():
        assert [s.cfg.train.seed for s in specs] == [0, 1]
        # every DINO variant gets a complete schedule of 60% of the Deformable recipe's steps
        expected = deformable_steps if name == "deformable" else int(0.6 * deformable_steps)
        assert {s.cfg.train.max_steps for s in specs} == {expected}
        assert {s.cfg.data.batch_size for s in specs} == {4}
        assert {s.cfg.train.eval_every for s in specs} == {100}
        assert all(s.depends_on == ["backbone"] for s in specs)
    assert all(s.cfg.train.ema.enabled for s in groups["dino"])
    assert not any(s.cfg.train.ema.enabled for s in groups["deformable"])

    # measured with the focal loss (tiny_dino.yaml's own is varifocal now): pinned to it
    assert {s.cfg.criterion.class_loss for n in ("dino", "dino_groups") for s in groups[n]} == {"focal"}


def test_the_dino_aim_pipeline_compares_600_dino_steps_with_1000_deformable_steps():
    groups = load_pipeline(CONFIGS / "pipelines" / "dino_aim.yaml").groups()
    deformable, dino_600 = groups["deformable"], groups["dino_varifocal_600"]
    assert [s.cfg.train.seed for s in deformable] == [s.cfg.train.seed for s in dino_600] == [0, 1, 2, 3]
    assert {s.cfg.train.max_steps for s in deformable} == {1000}
    assert {(s.cfg.model.kind, s.cfg.criterion.class_loss, s.cfg.optim.lr) for s in deformable} == {
        ("deformable", "focal", 4.0e-4)}
    for name, loss, steps in (("dino_varifocal_600", "varifocal", 600), ("dino_focal_600", "focal", 600),
                              ("dino_varifocal", "varifocal", 1000)):
        assert {(s.cfg.model.kind, s.cfg.criterion.class_loss, s.cfg.optim.lr, s.cfg.train.max_steps)
                for s in groups[name]} == {("dino", loss, 6.0e-4, steps)}, name
    assert all(s.depends_on == ["backbone"] for name in groups if name != "backbone"
               for s in groups[name])

def _row(stage: str, ap: float, ap50: float) -> dict:
    return {"stage": stage, "status": "done", "metrics": {"AP": ap, "AP50": ap50},
            "main_metric": "AP"}


def test_summary_adds_mean_and_std_over_the_finished_seeds(tmp_path):
    pipeline = load_pipeline(_pipe(tmp_path, _stage("det", "    seeds: [0, 1, 2]\n")
                                   + _stage("plain")))
    rows = [_row("det_s0", 0.10, 0.30), _row("det_s1", 0.20, 0.50),
            {"stage": "det_s2", "status": "failed"}, _row("plain", 0.5, 0.6)]
    (agg,) = seed_rows(pipeline, rows)
    assert agg["group"] == "det" and agg["seeds"] == [0, 1] and agg["status"] == "2/3 seeds"
    assert agg["metrics"]["AP"] == pytest.approx(0.15)
    assert agg["metrics_std"]["AP"] == pytest.approx(0.0707107, abs=1e-6)  # sample std
    assert agg["metrics_std"]["AP50"] == pytest.approx(0.1414214, abs=1e-6)
    table = write_summary(pipeline, rows, tmp_path / "runs").read_text()
    assert "| det (mean ± std) | 2/3 seeds | 0.150 ± 0.071 | 0.400 ± 0.141 |" in table
    assert "| plain | done | 0.500 | 0.600 |" in table
    saved = json.loads((tmp_path / "runs" / "pipe" / "summary.json").read_text())
    assert [r["stage"] for r in saved][-1] == "det (mean ± std)"


def test_an_unseeded_pipeline_summary_has_no_aggregate_rows(tmp_path):
    pipeline = load_pipeline(_pipe(tmp_path, _stage("plain")))
    assert seed_rows(pipeline, [_row("plain", 0.5, 0.6)]) == []


def test_status_and_summary_columns_stay_aligned_with_long_seeded_names(tmp_path, capsys):
    pipe = _pipe(tmp_path, _stage("a") + _stage("dino_varifocal_600", "    seeds: [0, 1]\n"))
    pipeline = load_pipeline(pipe)
    show_status(pipe, tmp_path / "work")
    print_summary(pipeline, [{"stage": s.name, "status": "done", "seconds": 1.0}
                             for s in pipeline.stages], tmp_path / "work")
    lines = capsys.readouterr().out.splitlines()
    status_rows = [line for line in lines if "not started" in line]
    summary_rows = [line for line in lines if " done " in line]
    assert len(status_rows) == len(summary_rows) == 3
    assert len({row.index("not started") for row in status_rows}) == 1, status_rows
    assert len({row.index(" done ") for row in summary_rows}) == 1, summary_rows
