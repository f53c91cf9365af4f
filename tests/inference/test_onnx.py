"""`detrforge export --onnx`: model.onnx (opset >= 17, dynamic batch, deformable attention as
GridSample) whose onnxruntime AP equals PyTorch's through the same post-processing."""

from __future__ import annotations

import json

import onnx
import onnxruntime as ort
import pytest
import torch

from launch.cli import main
from pipeline.inference import onnx_export
from pipeline.inference.onnx_export import (
    OnnxExportConfig,
    OnnxParityError,
    check_parity,
    default_canvas,
)
from pipeline.inference.predictor import Predictor


@pytest.fixture(scope="module")
def onnx_out(tiny_export, tmp_path_factory):
    """`detrforge export models:/tiny.detr@latest --onnx --out DIR` of a registered tiny export."""
    from pipeline.registry import register_export
    from pipeline.tracking import tracking_uri_for

    workdir, out = tmp_path_factory.mktemp("reg"), tmp_path_factory.mktemp("onnx")
    register_export(tiny_export, "tiny.detr", tracking_uri_for(workdir))
    uri = ["export", "models:/tiny.detr@latest", "--onnx", "--workdir", str(workdir)]
    assert main(uri) == 2  # a downloaded model has no folder of its own: --out is needed
    assert main([*uri, "--out", str(out)]) == 0
    return out


def test_onnx_graph_has_opset_17_a_dynamic_batch_and_grid_sample(onnx_out):
    model = onnx.load(str(onnx_out / "model.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in model.graph.input] == ["images", "padding_mask"]
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch" and not batch.dim_value
    assert "GridSample" in {node.op_type for node in model.graph.node}


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_equals_pytorch_at_any_batch_size(onnx_out, tiny_export, batch):
    predictor = Predictor.from_export(tiny_export)
    canvas = default_canvas(predictor)
    images = torch.randint(0, 256, (batch, 3, *canvas), dtype=torch.uint8)
    mask = torch.zeros(batch, *canvas, dtype=torch.bool)
    mask[0, canvas[0] // 3:] = True  # a padded image beside unpadded ones
    session = ort.InferenceSession(str(onnx_out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, boxes = session.run(None, {"images": images.numpy(), "padding_mask": mask.numpy()})
    reference = predictor.forward(images, mask)
    torch.testing.assert_close(torch.from_numpy(logits), reference["pred_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.from_numpy(boxes), reference["pred_boxes"], atol=1e-5, rtol=0)


def test_parity_report_gives_both_aps_diffs_and_latencies(onnx_out, samples):
    report = json.loads((onnx_out / "onnx_parity.json").read_text())
    assert report["ap_diff"] == abs(report["ap_onnx"] - report["ap_pytorch"]) <= 0.005
    assert report["boxes_max_abs_diff"] < 1e-4 and report["scores_max_abs_diff"] < 1e-4
    assert report["first_divergence"] is None
    assert set(report["latency_ms_per_batch"]) == {"pytorch", "onnx"}
    assert report["data"] == str(samples / "detect" / "val") and report["images"] > 0
    assert len(report["metrics"]["onnx"]) == 12


def test_a_diverging_output_is_named(tiny_export, onnx_out, samples, monkeypatch):
    from launch.model_cli import _split_loader

    predictor = Predictor.from_export(tiny_export)
    onnx_pred = onnx_export.OnnxPredictor(onnx_out / "model.onnx", predictor, default_canvas(predictor))
    run = onnx_pred.forward
    monkeypatch.setattr(onnx_pred, "forward", lambda *a: {**run(*a), "pred_boxes": run(*a)["pred_boxes"] * 0.5})
    report = onnx_export.parity_report(predictor, onnx_pred, *_split_loader(predictor, samples / "detect" / "val"),
                                       OnnxExportConfig())
    assert report["first_divergence"]["output"] == "pred_boxes"
    assert report["first_divergence"]["batch"] == 0 and report["boxes_max_abs_diff"] > 0.01
    report.update(ap_diff=0.02)
    with pytest.raises(OnnxParityError, match="diverge first at pred_boxes"):
        check_parity(report, "onnx_parity.json")


def test_export_fails_with_exit_2_past_the_tolerance(tiny_export, onnx_out, tmp_path, monkeypatch,
                                                      capsys):
    real = onnx_export.parity_report

    def off_by_a_point(*args, **kwargs):
        return {**real(*args, **kwargs), "ap_diff": 0.01}

    def copy_the_traced_graph(predictor, path, cfg):  # tracing again would only cost time
        path.write_bytes((onnx_out / "model.onnx").read_bytes())
        return path

    monkeypatch.setattr(onnx_export, "export_onnx", copy_the_traced_graph)
    monkeypatch.setattr(onnx_export, "parity_report", off_by_a_point)
    assert main(["export", str(tiny_export), "--onnx", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "differs by 0.0100 > 0.005" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "onnx_parity.json").is_file()


def test_onnx_config_rejects_an_old_opset():
    with pytest.raises(Exception, match="opset must be >= 17"):
        OnnxExportConfig(opset=13)
