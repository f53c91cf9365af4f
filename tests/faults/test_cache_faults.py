"""Stage cache blind spots: a moved models:/ alias, a deleted or replaced export behind
DONE.json, a changed number of processes. Each makes the stage not up to date, and nothing of
the finished stage is deleted by the check."""

from __future__ import annotations

import torch

from pipeline.export import write_export
from stages.inputs import export_is_intact, input_fingerprints, registered_fingerprint


def test_a_moved_alias_changes_the_fingerprint(tmp_path):
    from pipeline.tracking import mlflow_client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow_client(uri)
    client.create_registered_model("pipe.detr")
    first = client.create_model_version("pipe.detr", source=str(tmp_path / "a"))
    second = client.create_model_version("pipe.detr", source=str(tmp_path / "b"))
    client.set_registered_model_alias("pipe.detr", "production", first.version)
    before = registered_fingerprint("models:/pipe.detr@production", uri)
    assert before == registered_fingerprint("models:/pipe.detr@production", uri)
    client.set_registered_model_alias("pipe.detr", "production", second.version)
    after = registered_fingerprint("models:/pipe.detr@production", uri)
    assert before != after and after.startswith(f"pipe.detr/{second.version}:")


def test_a_deleted_or_replaced_export_is_not_intact(tmp_path):
    export = tmp_path / "export"
    write_export(export, {"w": torch.ones(2)}, {})
    assert export_is_intact(export)
    weights = export / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    assert not export_is_intact(export)
    weights.unlink()
    assert not export_is_intact(export)


def test_path_inputs_and_processes_are_in_the_fingerprints(tmp_path):
    class Cfg:
        init_from = str(tmp_path / "export")
        backbone_init = None

    write_export(tmp_path / "export", {"w": torch.ones(2)}, {})
    one = input_fingerprints(tmp_path, "pipe", [], None, cfg=Cfg(), processes=1)
    write_export(tmp_path / "export", {"w": torch.zeros(2)}, {})
    two = input_fingerprints(tmp_path, "pipe", [], None, cfg=Cfg(), processes=1)
    assert one[Cfg.init_from] != two[Cfg.init_from]
    assert input_fingerprints(tmp_path, "pipe", [], None, cfg=Cfg(), processes=2) != two


def test_a_done_stage_whose_export_vanished_is_not_up_to_date(finished_pipeline):
    from launch.graph import is_up_to_date, load_pipeline

    pipe, workdir = finished_pipeline
    pipeline = load_pipeline(pipe)
    spec = pipeline.stage("backbone")
    assert is_up_to_date(pipeline, spec, workdir)
    (workdir / "pipe" / "backbone" / "export" / "model.safetensors").unlink()
    assert not is_up_to_date(pipeline, spec, workdir)
    assert (workdir / "pipe" / "backbone" / "DONE.json").is_file()  # the check deletes nothing
