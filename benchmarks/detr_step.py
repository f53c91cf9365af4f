"""Time and memory of one Deformable-DETR training step and of ``ms_deform_attn`` alone, side by
side with HF transformers' ``DeformableDetrForObjectDetection`` and its
``MultiScaleDeformableAttention`` at the same sizes.

    python benchmarks/detr_step.py --out results/ [--config r50] [--dtype bf16] [--device cuda]

Writes ``<out>/detr_step.json``. The peer needs ``pip install transformers`` (the ``bench``
extra); without it the peer rows are skipped with a note. The step is the REAL training step of
each: forward, Hungarian matcher and set criterion with auxiliary losses, backward and an AdamW
step (HF: ``labels=``, its own matcher and loss), on the same images and targets. Contenders are
timed in interleaved rounds and medians reported, so load changes on a shared machine hit both
alike. On CUDA, times come from CUDA events after warm-up and memory from
``max_memory_allocated``; on CPU, wall time only.

On CUDA, "ours" is the default dispatch (the fused Triton ``ms_deform_attn``) and "ours_pytorch"
the same step with the pure PyTorch paths. ``--profile N`` adds a torch.profiler table.

Seen on one H200 (torch 2.11, transformers 5.17, ``--config r50``; benchmarks/RESULTS.md): bf16
step ours 102.6 ms / 5.08 GB, pure PyTorch attention 149.1 ms, HF 140.3 ms / 10.02 GB (1.38x);
fp32 127.4 against HF 152.3 ms (1.26x); ms_deform_attn fwd+bwd at encoder sizes 2.8 ms against
HF 13.9 ms, decoder sizes 1.1 against 2.1 ms.

Seen once on one H100 before (2 images 800x1088, 10-15 timed steps; before the fused Triton
kernel existed):

- ms_deform_attn fwd+bwd, encoder sizes (18071 queries): ours 14.5 ms (canvas) / 15.2 ms
  (grid_sample), HF 15.3 ms, both ~2.08 GB peak; decoder sizes (300 queries): ours 2.1 ms
  (grid_sample), HF 2.2 ms.
- training step fp32: ours 167 ms / 9.70 GB, HF 166 ms / 9.06 GB; bf16 autocast: ours 152 ms /
  9.16 GB, HF 157 ms / 9.26 GB. grid_sample's backward was a third of our step's CUDA time
  (torch profiler): the reason for the fused kernel.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.engine.optim import OptimizerConfig, build_optimizer
from pipeline.models import BackboneConfig, DetectorConfig, build_detector
from pipeline.models.ops import ms_deform_attn, ms_deform_attn_pytorch, register_kernel

# named configs: detector sizes + input size; "r50" is the paper's Deformable DETR
CONFIGS: dict[str, dict] = {
    "r50": dict(backbone="resnet50", hidden_dim=256, enc_layers=6, dec_layers=6, num_queries=300,
                dim_feedforward=1024, levels=4, points=4, heads=8, height=800, width=1088, batch=2),
    "r50-refine-2stage": dict(backbone="resnet50", hidden_dim=256, enc_layers=6, dec_layers=6, num_queries=300,
                              dim_feedforward=1024, levels=4, points=4, heads=8, height=800, width=1088,
                              batch=2, box_refine=True, two_stage=True),
    "tiny": dict(backbone="resnet18", hidden_dim=64, enc_layers=2, dec_layers=2, num_queries=50,
                 dim_feedforward=128, levels=4, points=4, heads=4, height=256, width=320, batch=2),
}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Callable[[], None], device: torch.device, warmup: int, steps: int, clock: str = "wall") -> dict:
    """Mean milliseconds per call of ``fn`` and peak memory (CUDA only). ``clock="cpu"`` counts
    this process's CPU time instead of wall time: with one torch thread it is the work a step
    costs, which other jobs on a shared machine do not inflate the way they inflate wall time."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return {"ms": start.elapsed_time(end) / steps, "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    now = CLOCKS[clock]
    begin = now()
    for _ in range(steps):
        fn()
    return {"ms": (now() - begin) * 1000 / steps, "peak_mem_mb": None}


def first_call_failure(fn: Callable[[], None]) -> str | None:
    """None if ``fn`` runs, else its error in one line (the benchmark records it and goes on)."""
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - any failure of one contender is reported, not fatal
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:500]
    return None


def autocast(device: torch.device, dtype: str):
    enabled = dtype == "bf16"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def ours_model(spec: dict, num_classes: int) -> torch.nn.Module:
    backbone = BackboneConfig(name=spec["backbone"], out_strides=[8, 16, 32], frozen_stages=2)
    cfg = DetectorConfig(
        kind="deformable", num_classes=num_classes, num_queries=spec["num_queries"], hidden_dim=spec["hidden_dim"],
        num_feature_levels=spec["levels"], enc_layers=spec["enc_layers"], dec_layers=spec["dec_layers"],
        nheads=spec["heads"], enc_n_points=spec["points"], dec_n_points=spec["points"],
        dim_feedforward=spec["dim_feedforward"], two_stage=spec.get("two_stage", False),
        box_refine=spec.get("box_refine", False), backbone=backbone,
    )
    return build_detector(cfg)


def hf_model(spec: dict, num_classes: int) -> torch.nn.Module:
    """The peer model at the same sizes, random init, timm backbone (no download)."""
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    config = DeformableDetrConfig(
        use_timm_backbone=True, backbone=spec["backbone"], use_pretrained_backbone=False,
        num_labels=num_classes, num_queries=spec["num_queries"], d_model=spec["hidden_dim"],
        encoder_layers=spec["enc_layers"], decoder_layers=spec["dec_layers"],
        encoder_attention_heads=spec["heads"], decoder_attention_heads=spec["heads"],
        encoder_ffn_dim=spec["dim_feedforward"], decoder_ffn_dim=spec["dim_feedforward"],
        num_feature_levels=spec["levels"], encoder_n_points=spec["points"], decoder_n_points=spec["points"],
        two_stage=spec.get("two_stage", False), with_box_refine=spec.get("box_refine", False),
        two_stage_num_proposals=spec["num_queries"],
        # the paper's dropout everywhere, as ours (HF's defaults leave attention and FFN
        # activations without it, which is less work per step and another model)
        dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
    )
    model = DeformableDetrForObjectDetection(config)
    # The paper (and HF's own intent) freezes the stem and the first stage; in this version HF's
    # check for timm names does not match and trains the whole body. Freeze them here so both
    # sides train the same parameters (ours: frozen_stages=2).
    for name, param in model.model.backbone.named_parameters():
        if not any(f"layer{k}" in name for k in (2, 3, 4)):
            param.requires_grad_(False)
    return model


def make_targets(batch: int, num_classes: int, device: torch.device, seed: int = 0) -> list[dict]:
    """A few boxes per image (cx, cy, w, h in [0, 1]) and labels, as the loaders give them."""
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for i in range(batch):
        n = 3 + 4 * i
        centre = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
        size = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
        labels = torch.randint(0, num_classes, (n,), generator=generator)
        targets.append({"boxes": torch.cat([centre, size], 1).to(device), "labels": labels.to(device)})
    return targets


def step_fn(model: torch.nn.Module, images, mask, targets, device, dtype: str, peer: bool,
            criterion=None) -> Callable[[], None]:
    """The REAL training step: forward, matcher + set criterion (with auxiliary losses),
    backward, AdamW step. HF's through ``labels=`` (its own matcher and loss). Each side steps
    the optimizer its trainer uses: ours ``build_optimizer`` (parameter groups, fused AdamW), HF's
    ``Trainer`` default ``adamw_torch_fused``."""
    if peer:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    else:
        optimizer = build_optimizer(model, OptimizerConfig(lr=1e-5))
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]

    def run() -> None:
        with autocast(device, dtype):
            if peer:
                loss = model(pixel_values=images, pixel_mask=(~mask).long(), labels=labels).loss
            else:
                outputs = model(images, mask)
                loss = criterion(outputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def ours_criterion(num_classes: int):
    from pipeline.losses.set_criterion import CriterionConfig, SetCriterion

    cfg = CriterionConfig()
    criterion = SetCriterion.from_config(cfg, num_classes, focal=True)
    return lambda outputs, targets: SetCriterion.weighted_total(criterion(outputs, targets), cfg.weights)


def bench_models(spec: dict, device: torch.device, args) -> dict:
    """Ours and HF's real step, timed in interleaved rounds (medians; same-run ratio)."""
    batch, height, width = spec["batch"], spec["height"], spec["width"]
    images = torch.randn(batch, 3, height, width, device=device)
    mask = torch.zeros(batch, height, width, dtype=torch.bool, device=device)
    mask[1:, :, width * 3 // 4 :] = True  # a padded image, as in a real batch
    targets = make_targets(batch, args.num_classes, device)
    torch.manual_seed(0)
    model = ours_model(spec, args.num_classes).to(device).train()
    steps = {"ours": step_fn(model, images, mask, targets, device, args.dtype, False,
                             ours_criterion(args.num_classes))}
    result = {"ours": {"params_m": sum(p.numel() for p in model.parameters()) / 1e6}}
    pure = pure_pytorch_step(model, images, mask, targets, device, args)
    if pure is not None:
        steps["ours_pytorch"] = pure
        result["ours_pytorch"] = dict(result["ours"])
    try:
        peer = hf_model(spec, args.num_classes).to(device).train()
    except ImportError as error:
        result["peer_note"] = f"transformers not installed ({error}); pip install transformers to compare"
    else:
        steps["hf"] = step_fn(peer, images, mask, targets, device, args.dtype, True)
        result["hf"] = {"params_m": sum(p.numel() for p in peer.parameters()) / 1e6}
    rounds: dict[str, list[dict]] = {name: [] for name in steps}
    for round_index in range(args.rounds):
        for name, fn in steps.items():
            rounds[name].append(timed(fn, device, args.warmup if round_index == 0 else 1, args.steps, args.clock))
    for name, timings in rounds.items():
        result[name]["ms"] = statistics.median(t["ms"] for t in timings)
        result[name]["ms_rounds"] = [t["ms"] for t in timings]
        result[name]["peak_mem_mb"] = max((t["peak_mem_mb"] or 0) for t in timings) or None
    if "hf" in rounds:
        for name in [k for k in rounds if k != "hf"]:
            ratios = [h["ms"] / o["ms"] for o, h in zip(rounds[name], rounds["hf"])]
            result[f"speedup_{name}_over_hf"] = statistics.median(ratios)
    tflop = step_tflop(steps["ours"])  # the same model, so the same FLOPs for every "ours"
    for name in [k for k in steps if k.startswith("ours")]:
        result[name].update(utilisation(tflop, result[name]["ms"], device, args))
    if args.profile:
        result["ours"]["profile"] = profile_step(steps["ours"], device, args.profile, args.out)
    return result


def profile_step(step: Callable[[], None], device: torch.device, steps: int, out: Path) -> dict:
    """torch.profiler over ``steps`` steps: the ops by self device time and by CPU time in
    ``<out>/detr_step_profile.txt``; returns how busy the device was (kernel time / wall time)
    and, per step, the host-device synchronisations, copies and kernel launches."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    with profile(activities=activities) as prof:
        begin = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - begin) * 1000 / steps
    averages = prof.key_averages()
    device_ms = device_kernel_us(averages) / 1000 / steps
    counts = {e.key: e.count / steps for e in averages
              if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense",
                           "cudaMemcpyAsync", "cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")}
    out.mkdir(parents=True, exist_ok=True)
    tables = [averages.table(sort_by=key, row_limit=45) for key in
              (["self_device_time_total"] if device.type == "cuda" else []) + ["cpu_time_total"]]
    (out / "detr_step_profile.txt").write_text("\n\n".join(tables))
    return {"wall_ms": wall_ms, "device_busy_ms": device_ms, "device_busy": device_ms / wall_ms,
            "per_step_counts": counts}


def device_kernel_us(averages) -> float:
    """Microseconds the device ran kernels: its own events only, as the profiler's table sums
    them (an op's row repeats the time of the kernels it launched)."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in averages
               if e.device_type not in (DeviceType.CPU,) and not getattr(e, "is_user_annotation", False))


def pure_pytorch_step(model, images, mask, targets, device, args) -> Callable[[], None] | None:
    """On CUDA, our step with ``ms_deform_attn`` kept on its pure PyTorch paths (the default
    there is the fused Triton kernel): the same model, its own optimizer. None elsewhere."""
    if device.type != "cuda":
        return None
    inner = step_fn(model, images, mask, targets, device, args.dtype, False, ours_criterion(args.num_classes))

    def run() -> None:
        register_kernel("cuda", ms_deform_attn_pytorch)
        try:
            inner()
        finally:
            register_kernel("cuda", None)

    return run


# Dense peak TFLOPS per device name fragment and autocast dtype (vendor datasheets; fp32 without
# TF32): the denominator of the model FLOPs utilisation.
PEAK_TFLOPS = {("H100", "bf16"): 989.0, ("H100", "fp32"): 67.0, ("H200", "bf16"): 989.0,
               ("H200", "fp32"): 67.0, ("A100", "bf16"): 312.0, ("A100", "fp32"): 19.5}


def step_tflop(step: Callable[[], None]) -> float:
    """TFLOP of one training step (forward + backward, counted by torch's FlopCounterMode:
    matmuls and convolutions; grid_sample and element-wise ops count 0)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops() / 1e12


def utilisation(tflop: float, step_ms: float, device: torch.device, args) -> dict:
    """The rate a step of ``tflop`` ran at and, on a GPU of known peak (or ``--peak-tflops``),
    the model FLOPs utilisation."""
    out = {"step_tflop": tflop, "achieved_tflops": tflop / (step_ms / 1000)}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = args.peak_tflops or next((v for (k, d), v in PEAK_TFLOPS.items() if k in name and d == args.dtype), None)
    if peak:
        out.update(peak_tflops=peak, mfu=out["achieved_tflops"] / peak)
    return out


def attention_inputs(spec: dict, device: torch.device, queries: int, dtype: torch.dtype):
    """Encoder-like inputs: levels at strides 8..64 of the image, ``queries`` queries."""
    shapes = [(math.ceil(spec["height"] / s), math.ceil(spec["width"] / s)) for s in (8, 16, 32, 64)[: spec["levels"]]]
    spatial = torch.tensor(shapes, dtype=torch.long, device=device)
    tokens = sum(h * w for h, w in shapes)
    heads, channels = spec["heads"], spec["hidden_dim"] // spec["heads"]
    batch, levels, points = spec["batch"], spec["levels"], spec["points"]
    make = dict(device=device, dtype=dtype, requires_grad=True)
    value = torch.randn(batch, tokens, heads, channels, **make)
    locations = torch.rand(batch, queries, heads, levels, points, 2, **make)
    weights = torch.rand(batch, queries, heads, levels, points, **make)
    return value, spatial, locations, weights


def hf_attention() -> Callable | None:
    """Peer op with our call signature, from HF's module (or function, older versions)."""
    try:
        from transformers.models.deformable_detr import modeling_deformable_detr as hf
    except ImportError:
        return None
    if hasattr(hf, "MultiScaleDeformableAttention"):
        module = hf.MultiScaleDeformableAttention()
        names = inspect.signature(module.forward).parameters

        def run(value, spatial, locations, weights):
            given = dict(
                value=value, value_spatial_shapes=spatial, value_spatial_shapes_list=[tuple(s) for s in spatial.tolist()],
                level_start_index=torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]]),
                sampling_locations=locations, attention_weights=weights, im2col_step=64,
            )
            return module(**{k: v for k, v in given.items() if k in names})

        return run
    return lambda value, spatial, locations, weights: hf.multi_scale_deformable_attention(value, spatial, locations, weights)


ATTN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bench_attention(spec: dict, device: torch.device, args) -> dict:
    """fwd+bwd of every path at encoder and decoder sizes, per input dtype ("encoder" is fp32
    inputs, "encoder_bf16" bf16 inputs, which ``ms_deform_attn`` computes in fp32)."""
    result = {}
    for name in args.attn_dtypes.split(","):
        for role, entry in bench_attention_dtype(spec, device, args, ATTN_DTYPES[name]).items():
            result[role if name == "fp32" else f"{role}_{name}"] = entry
    return result


def bench_attention_dtype(spec: dict, device: torch.device, args, dtype: torch.dtype) -> dict:
    result = {}
    for role, queries in (("encoder", None), ("decoder", spec["num_queries"])):
        probe = attention_inputs(spec, device, 1, dtype)
        queries = probe[0].shape[1] if queries is None else queries
        inputs = attention_inputs(spec, device, queries, dtype)
        entry = {"queries": queries, "tokens": inputs[0].shape[1], "dtype": str(dtype)}
        candidates = {
            "ours_gather": lambda *a: ms_deform_attn(*a, impl="gather"),
            "ours_grid_sample": lambda *a: ms_deform_attn(*a, impl="grid_sample"),
            "ours_canvas": lambda *a: ms_deform_attn(*a, impl="canvas"),
            "ours_triton": lambda *a: ms_deform_attn(*a, impl="triton"),
            "ours_default": ms_deform_attn,
        }
        peer = hf_attention()
        if peer is not None:
            candidates["hf"] = peer
        if device.type != "cuda":
            del candidates["ours_triton"]
        if role == "encoder" and args.encoder_candidates == "fast":
            del candidates["ours_gather"]
        runs = {}
        for name, op in candidates.items():
            def run(op=op, inputs=inputs):
                op(*inputs).sum().backward()
            failure = first_call_failure(run)
            if failure:  # e.g. a kernel that does not compile here: recorded, the rest still timed
                entry[name] = {"error": failure}
            else:
                runs[name] = run
        timings: dict[str, list[float]] = {name: [] for name in runs}
        for round_index in range(args.rounds):  # interleaved: load changes hit all alike
            for name, run in runs.items():
                warmup = args.warmup if round_index == 0 else 1
                timings[name].append(timed(run, device, warmup, args.steps, args.clock)["ms"])
        for name, values in timings.items():
            entry[name] = {"ms": statistics.median(values), "ms_rounds": values}
        if peer is None:
            entry["peer_note"] = "transformers not installed; pip install transformers to compare"
        elif "hf" in runs:  # else its first call failed, and entry["hf"] says why
            for name in [k for k in runs if k != "hf"]:
                entry[f"time_ratio_{name}_over_hf"] = entry[name]["ms"] / entry["hf"]["ms"]
        result[role] = entry
    return result


def step_parser(description: str, outputs: str) -> argparse.ArgumentParser:
    """The flags every step benchmark takes: where to write ``outputs``, which named config,
    on which device, in which autocast dtype."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, type=Path, help=f"folder for {outputs}")
    parser.add_argument("--config", default="r50", choices=sorted(CONFIGS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="autocast dtype of the step")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = step_parser(__doc__.split("\n\n")[0], "detr_step.json")
    parser.add_argument("--batch", type=int, default=None, help="override the config's batch size")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num-classes", type=int, default=91)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--skip-model", action="store_true", help="only time ms_deform_attn")
    parser.add_argument("--skip-attention", action="store_true", help="only time the step")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile our step over STEPS steps (detr_step_profile.txt)")
    parser.add_argument("--attn-dtypes", default="fp32",
                        help="input dtypes of the ms_deform_attn timing, comma-separated: fp32,bf16")
    parser.add_argument("--encoder-candidates", default="all",
                        help="'fast' skips the gather path at encoder sizes (slow on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak for the MFU (default: known GPUs by name)")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="'cpu': process CPU time (use with --threads 1 on a shared machine)")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures CPU work; on CUDA the times come from CUDA events")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = dict(CONFIGS[args.config])
    spec.update({k: getattr(args, k) for k in ("batch", "height", "width") if getattr(args, k) is not None})
    device = torch.device(args.device)
    report = {
        "config": args.config, "spec": spec, "dtype": args.dtype, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "steps": args.steps, "warmup": args.warmup,
        "threads": torch.get_num_threads(), "clock": args.clock if device.type == "cpu" else "cuda_events",
    }
    if not args.skip_attention:
        report["ms_deform_attn"] = bench_attention(spec, device, args)
    if not args.skip_model:
        report["train_step"] = bench_models(spec, device, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detr_step.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
