"""train.elastic_resume in one process: the data position re-derived for another world size, the
schedule continued from the new peak lr, the one-line refusals, the record of the change, and
the switch kept out of the config hash. (2 ranks -> 1 for real: tests/integration/.)"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline import checkpoint
from pipeline.checkpoint import CheckpointMismatchError, RunFolder, resume, save_checkpoint
from pipeline.checkpoint_elastic import WorldChange, record_world_change, rng_state_for
from pipeline.config import config_hash, dump_yaml
from pipeline.data.detection import DetectionDataConfig, build_detection_loader
from pipeline.data.errors import DataError
from pipeline.data.samples import make_samples
from pipeline.data.stream_elastic import resharded_position
from pipeline.dist import DistEnv
from pipeline.engine.optim import OptimizerConfig, build_scheduler
from pipeline.engine.state import TrainState
from pipeline.engine.strategy import (
    DeepSpeedStrategy,
    StrategyConfig,
    build_strategy,
    continue_schedule_at_built_lr,
)
from pipeline.engine.zero_reshard import _GroupSlice
from stages.common import TrainConfig


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    make_samples(out, "tiny", seed=0)
    return out


def _state(epoch, batches, steps, world, skipped=None, batch_size=4, streams=2):
    fingerprint = {"seed": 0, "world_size": world, "num_streams": streams,
                   "batch_size": batch_size, "steps_per_epoch": steps, "shards": ["a", "b"]}
    return {"epoch": epoch, "batches_in_epoch": batches, "positions": [0] * streams,
            "skipped": skipped or {}, "fingerprint": fingerprint}


def test_position_keeps_the_epoch_and_the_fraction_consumed_rounded_up():
    saved = [_state(3, 3, 10, 2, {"bad_jpeg": 1}), _state(3, 3, 10, 2, {"bad_jpeg": 2})]
    new = _state(0, 0, 20, 1)["fingerprint"]
    position = resharded_position(saved, rank=0, world_size=1, fingerprint=new)
    # 3 of 10 batches -> 6 of 20; batches 0, 2, 4 from stream 0 and 1, 3, 5 from stream 1
    assert position["epoch"] == 3 and position["batches_in_epoch"] == 6
    assert position["positions"] == [3 * 4, 3 * 4]
    assert position["skipped"] == {"bad_jpeg": 3}  # both old ranks' counts on the one new rank
    # Growing 1 -> 2 ranks: 7 of 20 is 3.5 of 10, rounded up (the epoch never gets longer).
    grown = [resharded_position([_state(1, 7, 20, 1, {"x": 5})], rank=rank, world_size=2,
                                fingerprint=_state(0, 0, 10, 2)["fingerprint"])
             for rank in range(2)]
    assert [g["batches_in_epoch"] for g in grown] == [4, 4]
    assert grown[0]["positions"] == [2 * 4, 2 * 4] and grown[1]["skipped"] == {}
    assert 7 / 20 + (10 - 4) / 10 <= 1  # the fractions read before and after add up to <= 1
    done = resharded_position([_state(0, 10, 10, 2)] * 2, rank=0, world_size=1,
                              fingerprint=_state(0, 0, 20, 1)["fingerprint"])
    assert done["batches_in_epoch"] == 20  # a finished epoch stays finished


def test_position_refuses_ranks_that_disagree():
    with pytest.raises(DataError, match="disagree"):
        resharded_position([_state(0, 3, 10, 2), _state(0, 4, 10, 2)], rank=0, world_size=1,
                           fingerprint=_state(0, 0, 20, 1)["fingerprint"])


def _detect_cfg(root: Path, **overrides) -> DetectionDataConfig:
    settings = dict(shards=str(root), batch_size=2, num_workers=0, train_scales=[48],
                    max_size=64, eval_size=48, shuffle_buffer=8)
    settings.update(overrides)
    return DetectionDataConfig(**settings)


def _ids(loader, count: int) -> list:
    out = []
    while len(out) < count:
        for batch in loader:
            out.append([t["image_id"] for t in batch["targets"]] + [batch["images"].sum().item()])
            if len(out) == count:
                break
    return out


# steps_per_epoch None: derived from the world size (6 per rank on 2 ranks, 12 on 1); 5: fixed,
# and 3 consumed batches then leave the two streams at different positions.
@pytest.mark.parametrize("num_workers, steps_per_epoch", [(0, None), (2, None), (2, 5)])
def test_two_rank_position_continues_on_one_rank_as_its_uninterrupted_run(
        samples, num_workers, steps_per_epoch):
    cfg = _detect_cfg(samples / "detect", num_workers=num_workers,
                      steps_per_epoch=steps_per_epoch)
    old = [build_detection_loader(cfg, "train", rank=r, world_size=2, seed=5) for r in range(2)]
    for loader in old:
        _ids(loader, 3)
    saved = [json.loads(json.dumps(loader.state_dict())) for loader in old]
    new = build_detection_loader(cfg, "train", rank=0, world_size=1, seed=5)
    assert new.steps_per_epoch == (steps_per_epoch or 2 * old[0].steps_per_epoch)
    new.load_resharded_state_dict(saved)
    consumed = math.ceil(3 * new.steps_per_epoch / old[0].steps_per_epoch)
    assert (new.epoch, new.batches_in_epoch) == (0, consumed)
    rest = list(new)
    assert len(rest) == new.steps_per_epoch - consumed  # the epoch ends where it would have
    # The rest of the epoch and the next one: the batches an uninterrupted 1-rank run reads.
    new.load_resharded_state_dict(saved)
    straight = build_detection_loader(cfg, "train", rank=0, world_size=1, seed=5)
    steps = new.steps_per_epoch
    assert _ids(new, steps - consumed + 2) == _ids(straight, steps + 2)[consumed:]


def test_position_refuses_another_data_setup(samples):
    cfg = _detect_cfg(samples / "detect")
    saved = [build_detection_loader(cfg, "train", rank=r, world_size=2).state_dict()
             for r in range(2)]
    other = build_detection_loader(_detect_cfg(samples / "detect", batch_size=3), "train")
    with pytest.raises(DataError, match="batch_size"):
        other.load_resharded_state_dict(saved)


def test_schedule_continues_at_its_step_from_the_peak_lr_built_for_this_run():
    cfg = OptimizerConfig(lr=2e-3, warmup_steps=2, schedule="cosine")
    params = [torch.nn.Parameter(torch.zeros(2))]
    old = build_scheduler(torch.optim.AdamW(params, lr=cfg.lr), cfg, total_steps=10)
    for _ in range(4):
        old.optimizer.step()
        old.step()
    half = OptimizerConfig(lr=1e-3, warmup_steps=2, schedule="cosine")
    new = build_scheduler(torch.optim.AdamW(params, lr=half.lr), half, total_steps=10)
    built = [{"lr": 1e-3}]
    new.load_state_dict(old.state_dict())  # what a checkpoint load does: the old peak comes back
    assert new.base_lrs == [2e-3]
    continue_schedule_at_built_lr(new, built)
    expected = 1e-3 * new.lr_lambdas[0](4)
    assert new.last_epoch == 4 and math.isclose(new.optimizer.param_groups[0]["lr"], expected)
    assert math.isclose(new.get_last_lr()[0], expected)
    new.optimizer.step()
    new.step()
    assert math.isclose(new.get_last_lr()[0], 1e-3 * new.lr_lambdas[0](5))


def test_zero_partitions_are_cut_anew_from_the_saved_ones_put_end_to_end():
    # A 7-element group saved by 2 ranks (4 + 3, the last one's padding already cut off),
    # re-partitioned for 3 ranks of 3 elements: the last one padded with zeros.
    saved = [torch.arange(0.0, 4.0), torch.arange(4.0, 7.0)]
    for rank, expected in enumerate([[0, 1, 2], [3, 4, 5], [6, 0, 0]]):
        piece = _GroupSlice(torch.zeros(3), rank)
        for fp32 in saved:
            piece.add(fp32, {"exp_avg": -fp32, "step": torch.tensor(5.0)})
        assert piece.seen == 7 and piece.fp32.tolist() == expected
        assert piece.states["exp_avg"].tolist() == [-v if v else 0.0 for v in expected]
        assert piece.scalars["step"] == 5.0


def _single(model):
    return build_strategy(StrategyConfig(kind="single", precision="fp32"), model,
                          OptimizerConfig(), 2, DistEnv(), total_steps=10)


def _two_rank_checkpoint(run: RunFolder) -> None:
    save_checkpoint(run, _single(torch.nn.Linear(2, 2)), TrainState(step=2))
    # As if 2 ranks had written it; this process is a world of 1.
    (run.step_dir(2) / checkpoint.WORLD_FILE).write_text(json.dumps({"world_size": 2}))


def test_without_the_switch_the_error_names_it(tmp_path):
    run = RunFolder(tmp_path)
    _two_rank_checkpoint(run)
    with pytest.raises(CheckpointMismatchError) as err:
        resume(run, torch.nn.Linear(2, 2), _single, TrainState())
    assert "train.elastic_resume=true" in str(err.value) and "\n" not in str(err.value)


def test_a_strategy_that_cannot_repartition_says_what_is_supported(tmp_path):
    run = RunFolder(tmp_path)
    _two_rank_checkpoint(run)
    with pytest.raises(CheckpointMismatchError) as err:
        resume(run, torch.nn.Linear(2, 2), _single, TrainState(), elastic=True)
    message = str(err.value)
    assert "SingleStrategy cannot re-partition" in message and "ZeRO stage 0, 1 or 2" in message
    assert run.latest_step() == 2  # nothing skipped or moved aside: an older one would not fit
    zero3 = SimpleNamespace(cfg=StrategyConfig(zero_stage=3))
    with pytest.raises(CheckpointMismatchError, match="ZeRO stage 0, 1 and 2 checkpoints only"):
        DeepSpeedStrategy.load_resharded(zero3, run.step_dir(2))


def test_rng_of_new_rank_r_is_saved_rank_r_modulo_the_old_world():
    assert [rng_state_for(["s0", "s1"], rank) for rank in range(4)] == ["s0", "s1", "s0", "s1"]
    assert rng_state_for(["s0", "s1", "s2"], 0) == "s0"


def test_each_change_is_appended_to_the_run_folder_record(tmp_path, caplog):
    run = RunFolder(tmp_path)
    for old, new in ((2, 1), (1, 4)):
        record_world_change(run, WorldChange(
            step=10 * old, checkpoint=f"step_{10 * old}", old_world_size=old, new_world_size=new,
            old_global_batch=8 * old, new_global_batch=8 * new, old_peak_lr=1e-3 * old,
            new_peak_lr=1e-3 * new, lr=5e-4))
    events = json.loads(run.world_changes_path.read_text())
    assert [(e["old_world_size"], e["new_world_size"]) for e in events] == [(2, 1), (1, 4)]
    assert events[0]["old_global_batch"] == 16 and events[0]["new_global_batch"] == 8
    assert "2 -> 1 ranks, global batch 16 -> 8" in caplog.text


def test_the_switch_is_shown_but_not_hashed():
    plain, elastic = TrainConfig(), TrainConfig(elastic_resume=True)
    assert config_hash(plain) == config_hash(elastic)  # switching it on keeps the run folder
    assert config_hash(plain) != config_hash(TrainConfig(max_steps=7))
    assert "elastic_resume: true" in dump_yaml(elastic)


def test_the_stage_records_batches_and_peak_lrs_of_both_worlds_and_tags_the_run(tmp_path):
    from stages.common import _record_world_change

    class Tags:
        def __init__(self):
            self.tags = {}

        def set_tags(self, tags):
            self.tags.update(tags)

    run, tracker = RunFolder(tmp_path), Tags()
    outcome = checkpoint.ResumeOutcome("resume", run.step_dir(6), saved_world_size=4)
    parts = SimpleNamespace(micro_batch_size=8)
    optim = OptimizerConfig(lr=1e-3, scale_lr_with_batch="sqrt", base_batch_size=64)
    _record_world_change(run, outcome, 6, parts, StrategyConfig(grad_accum_steps=2), optim,
                         SimpleNamespace(lr=4e-4), tracker)
    event, = json.loads(run.world_changes_path.read_text())
    assert (event["old_world_size"], event["new_world_size"], event["step"]) == (4, 1, 6)
    assert (event["old_global_batch"], event["new_global_batch"]) == (64, 16)
    assert math.isclose(event["old_peak_lr"], 1e-3) and math.isclose(event["new_peak_lr"], 5e-4)
    assert event["lr"] == 4e-4 and event["checkpoint"] == "step_6"
    assert tracker.tags == {"detrforge.elastic_resume": "step 6: 4 -> 1 ranks"}
