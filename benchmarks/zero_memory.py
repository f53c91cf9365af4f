"""Per-rank memory of ZeRO stages 0-3 for one model on 2 ranks: the sharding at work.

For each stage this script starts `torchrun --nproc_per_node 2` on itself, trains a few steps
through the engine (`fit` + the DeepSpeed strategy), and each rank counts the bytes of the
tensors it holds, each storage once. The model is an MLP (`--model mlp`, the default) or the real
detector (`--model detector`): the R50 Deformable-DETR of `detr_step.py` (`--config`, 91
classes) on random images (`--height`, `--width`, `--batch` per rank) with the matcher and set
criterion, e.g. `--model detector --height 320 --width 320 --batch 1`.

- params: module parameters (under ZeRO-3 the local partition `ds_tensor`);
- grads: `.grad` of module parameters and of the optimizer's own (fp32 master) parameters;
- optimizer: the optimizer's parameters not counted above (fp32 master partitions) and its state
  (Adam's exp_avg, exp_avg_sq);
- all_tensors: every tensor reachable from Python (flat buffers and gradient buckets too).

Counts are sampled just before and just after every optimizer step; the maximum is reported. On
CPU the process's peak RSS is reported too (it includes the interpreter and libraries); on CUDA
torch.cuda.max_memory_allocated. Usage: python benchmarks/zero_memory.py --out DIR [--model
detector] [--stages 0,2]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

STAGES = (0, 1, 2, 3)


def make_model(hidden: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(hidden, hidden), nn.GELU()]
    return nn.Sequential(*blocks, nn.Linear(hidden, 1))


class _StorageCounter:
    """Bytes per category, each storage counted once (in the first category that claims it)."""

    def __init__(self):
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {}

    def add(self, category: str, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.seen:
            return
        self.seen.add(key)
        self.bytes[category] = self.bytes.get(category, 0) + storage.nbytes()


def count_tensor_bytes(strategy) -> dict[str, int]:
    """This rank's tensor bytes by category (see the module docstring)."""
    counter = _StorageCounter()
    params = list(strategy.module.parameters())
    for param in params:
        counter.add("params", getattr(param, "ds_tensor", param))
    optimizer = getattr(strategy.engine.optimizer, "optimizer", strategy.engine.optimizer)
    master = [p for group in optimizer.param_groups for p in group["params"]]
    for param in params + master:
        counter.add("grads", param.grad)
    for param in master:
        counter.add("optimizer", param)
    for state in optimizer.state.values():
        for value in state.values():
            counter.add("optimizer", value)
    named = sum(counter.bytes.values())
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            counter.add("other", obj)
    result = {key: counter.bytes.get(key, 0) for key in ("params", "grads", "optimizer", "other")}
    result["all_tensors"] = named + result["other"]
    return result


def build_model(args) -> nn.Module:
    if args.model == "mlp":
        return make_model(args.hidden, args.layers)
    from detr_step import CONFIGS, ours_model

    torch.manual_seed(0)  # the same weights on every rank
    return ours_model(CONFIGS[args.config], args.num_classes)


def batches(args, rank: int):
    """Endless random batches of this rank: MLP inputs, or (images, padding mask, targets)."""
    gen = torch.Generator().manual_seed(rank)
    if args.model == "mlp":
        while True:
            yield torch.randn(args.batch, args.hidden, generator=gen)
    from detr_step import make_targets

    mask = torch.zeros(args.batch, args.height, args.width, dtype=torch.bool)
    targets = make_targets(args.batch, args.num_classes, torch.device("cpu"), seed=rank)
    while True:
        yield torch.randn(args.batch, 3, args.height, args.width, generator=gen), mask, targets


def make_task_step(args, strategy):
    """batch -> (loss, metrics) for `fit`: the MLP's mean square, or the detector's set loss."""
    if args.model == "mlp":
        def mlp_step(x):
            x = x.to(strategy.device, strategy.compute_dtype)
            return strategy.module(x).float().pow(2).mean(), {}

        return mlp_step
    from detr_step import ours_criterion

    criterion = ours_criterion(args.num_classes)

    def detector_step(batch):
        images, mask, targets = batch
        images = images.to(strategy.device, strategy.compute_dtype)
        targets = [{k: v.to(strategy.device) for k, v in t.items()} for t in targets]
        return criterion(strategy.module(images, mask.to(strategy.device)), targets), {}

    return detector_step


def worker(stage: int, result_path: Path, args) -> None:
    from pipeline import dist
    from pipeline.engine.loop import fit
    from pipeline.engine.optim import OptimizerConfig
    from pipeline.engine.state import TrainState
    from pipeline.engine.strategy import StrategyConfig, build_strategy

    env = dist.read_dist_env()
    dist.init_distributed(env)
    cfg = StrategyConfig(kind="deepspeed", zero_stage=stage, precision="auto", grad_clip=1.0)
    strategy = build_strategy(cfg, build_model(args), OptimizerConfig(lr=1e-4), args.batch, env,
                              total_steps=args.steps)
    peak: dict[str, int] = {}
    real_step = strategy.step

    def sample() -> None:
        for key, value in count_tensor_bytes(strategy).items():
            peak[key] = max(peak.get(key, 0), value)

    def measured_step() -> bool:
        sample()
        stepped = real_step()
        sample()
        return stepped

    strategy.step = measured_step
    started = time.perf_counter()
    fit(make_task_step(args, strategy), batches(args, env.rank), strategy, [], TrainState(),
        max_steps=args.steps)
    record = {"rank": env.rank, "tensor_bytes": peak,
              f"seconds_for_{args.steps}_steps": round(time.perf_counter() - started, 3),
              "device": str(strategy.device), "precision": strategy.precision}
    if torch.cuda.is_available():
        record["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated()
    else:
        record["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    all_records = dist.all_gather_object(record)
    if dist.is_main():  # whole or absent: the launcher reads it even if a rank dies in its exit
        partial = result_path.with_suffix(".part")
        partial.write_text(json.dumps(all_records))
        partial.replace(result_path)
    dist.shutdown()


def model_flags(args) -> list[str]:
    """The flags that define the workload, passed on to the workers."""
    names = ("model", "hidden", "layers", "config", "height", "width", "batch", "steps",
             "num_classes")
    return [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in names]


def launch(stage: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true")
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", str(args.nproc), __file__, "--worker", "--stage", str(stage),
                   "--result", str(result), *model_flags(args)]
        done = subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=args.stage_timeout)
        if done.returncode != 0 and not result.exists():
            raise RuntimeError(f"zero_memory.py: stage {stage} failed:\n{done.stderr[-4000:]}")
        if done.returncode != 0:  # seen rarely on CPU: a rank aborts in its exit, after the counts
            print(f"zero_memory.py: stage {stage}: results complete, but a rank exited with an "
                  f"error afterwards:\n{done.stderr[-1500:]}", file=sys.stderr)
        return json.loads(result.read_text())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=False, default=Path("benchmarks/results"))
    parser.add_argument("--model", default="mlp", choices=["mlp", "detector"])
    parser.add_argument("--hidden", type=int, default=1024, help="MLP width")
    parser.add_argument("--layers", type=int, default=8, help="hidden x hidden layers")
    parser.add_argument("--config", default="r50", help="detector config of detr_step.py")
    parser.add_argument("--height", type=int, default=320, help="detector image height")
    parser.add_argument("--width", type=int, default=320, help="detector image width")
    parser.add_argument("--batch", type=int, default=None, help="per rank (MLP 4, detector 1)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per stage")
    parser.add_argument("--num-classes", type=int, default=91)
    parser.add_argument("--stages", default="0,1,2,3", help="ZeRO stages, comma-separated")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--stage-timeout", type=int, default=1800, help="seconds per stage")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch = args.batch or (4 if args.model == "mlp" else 1)
    stages = [int(s) for s in args.stages.split(",")]
    if not set(stages) <= set(STAGES):
        parser.error(f"--stages: ZeRO stages are {STAGES}, got {args.stages}")
    args.stage_list = stages
    return args


def describe(args) -> str:
    if args.model == "mlp":
        return f"MLP {args.layers}x{args.hidden}"
    return (f"Deformable-DETR {args.config} ({args.num_classes} classes), {args.batch} image(s) "
            f"{args.height}x{args.width} per rank")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.stage, args.result, args)
        return
    num_params = sum(p.numel() for p in build_model(args).parameters())
    report = {"model": describe(args), "num_params": num_params,
              "fp32_param_bytes": num_params * 4, "world_size": args.nproc,
              "steps": args.steps, "stages": {}}
    for stage in args.stage_list:
        report["stages"][f"zero{stage}"] = launch(stage, args)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "zero_memory.json" if args.model == "mlp" else "zero_memory_detector.json"
    (args.out / name).write_text(json.dumps(report, indent=2))
    print(f"{report['model']}: {num_params / 1e6:.2f} M params, {args.nproc} ranks; MiB per rank")
    print(f"{'stage':6} {'rank':4} {'params':>8} {'grads':>8} {'optim':>8} {'all':>8} {'peak':>8}")
    for name, records in report["stages"].items():
        for record in records:
            b = record["tensor_bytes"]
            peak = record.get("cuda_max_memory_allocated", record.get("peak_rss_bytes", 0))
            print(f"{name:6} {record['rank']:4} " + " ".join(
                f"{v / 2**20:8.1f}" for v in (b["params"], b["grads"], b["optimizer"],
                                              b["all_tensors"], peak)))


if __name__ == "__main__":
    main()
