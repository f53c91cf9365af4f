"""Time of Hungarian matching and of the set criterion (matching + losses, forward and backward),
today's batched path against the previous one, kept here as ``ReferenceMatcher``.

    python benchmarks/matching.py --out results/ [--device cpu] [--rounds 5]

The previous matcher paired every query of the batch with every target of the batch ((B*Q) x
T_total costs, B times the needed work), split the result per image and was called once per
decoder layer (one device->host copy each). Today's computes each image against its own targets,
padded, for all decoder layers in one call. Both are timed on the same random predictions in
interleaved rounds (medians), and their assignments are checked to be equal; the assignment step
alone is also timed in the calling thread and on the thread pool (``solve_padded(pool=True)``).
Writes ``<out>/matching.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment

from pipeline.boxes import box_cxcywh_to_xyxy, generalized_box_iou
from pipeline.losses.assignment import solve_padded
from pipeline.losses.matcher import HungarianMatcher, check_detection_inputs
from pipeline.losses.set_criterion import SetCriterion

# name: batch, queries, decoder layers (last + aux), (fewest, most) boxes per image
CASES: dict[str, tuple[int, int, int, tuple[int, int]]] = {
    "tiny-b4": (4, 50, 2, (1, 20)),
    "r50-b2": (2, 300, 6, (4, 10)),
    "r50-b4": (4, 300, 6, (4, 10)),
    "r50-b8": (8, 300, 6, (4, 10)),
    "r50-b4-crowded": (4, 300, 6, (50, 100)),
}
NUM_CLASSES = 91


class ReferenceMatcher(HungarianMatcher):
    """The previous matching path, for the comparison: all-pairs costs, one call per layer."""

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        check_detection_inputs(outputs, targets, outputs["pred_logits"].shape[-1] - (0 if self.focal else 1))
        batch_size, num_queries = outputs["pred_logits"].shape[:2]
        logits = outputs["pred_logits"].flatten(0, 1).float()
        boxes = outputs["pred_boxes"].flatten(0, 1).float()
        labels = torch.cat([t["labels"] for t in targets]).to(logits.device, torch.int64)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(logits.device, torch.float32)
        cost = (self.cost_class * self.classification_cost(logits, labels)
                + self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
                - self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes)))
        cost = self.replace_nonfinite(cost.view(batch_size, num_queries, len(labels)).cpu())
        indices = []
        for image, image_cost in enumerate(cost.split([len(t["boxes"]) for t in targets], dim=-1)):
            pred_idx, target_idx = linear_sum_assignment(image_cost[image].numpy())
            indices.append((torch.as_tensor(pred_idx, dtype=torch.int64),
                            torch.as_tensor(target_idx, dtype=torch.int64)))
        return indices

    def match_layers(self, layers: list[dict], targets: list[dict]) -> list:
        return [self(layer, targets) for layer in layers]


class ReferenceCriterion(SetCriterion):
    """SetCriterion as before: each decoder layer matched on its own."""

    def match_decoder_layers(self, layers: list[dict], targets: list[dict]) -> list:
        return [None] * len(layers)


def make_problem(case: tuple, device: torch.device, seed: int = 0) -> tuple[dict, list[dict]]:
    """Random decoder outputs (requiring grad) of every layer and random targets."""
    batch, queries, layers, (low, high) = case
    gen = torch.Generator().manual_seed(seed)

    def layer() -> dict:
        return {"pred_logits": torch.randn(batch, queries, NUM_CLASSES, generator=gen).to(device).requires_grad_(),
                "pred_boxes": (torch.rand(batch, queries, 4, generator=gen) * 0.5 + 0.1).to(device).requires_grad_()}

    outputs = {**layer(), "aux_outputs": [layer() for _ in range(layers - 1)]}
    targets = []
    for _ in range(batch):
        n = int(torch.randint(low, high + 1, (1,), generator=gen))
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (n,), generator=gen).to(device),
                        "boxes": (torch.rand(n, 4, generator=gen) * 0.5 + 0.1).to(device)})
    return outputs, targets


def timed_ms(fn, device: torch.device, steps: int) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    begin = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - begin) * 1000 / steps


def bench_case(case: tuple, device: torch.device, rounds: int, steps: int) -> dict:
    outputs, targets = make_problem(case, device)
    layers = [outputs, *outputs["aux_outputs"]]
    new, old = HungarianMatcher(focal=True), ReferenceMatcher(focal=True)
    same = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for la, lb in zip(new.match_layers(layers, targets), old.match_layers(layers, targets))
               for a, b in zip(la, lb))
    criteria = {"new": SetCriterion(NUM_CLASSES, new).to(device), "old": ReferenceCriterion(NUM_CLASSES, old).to(device)}

    def step(criterion: SetCriterion) -> None:
        sum(v for k, v in criterion(outputs, targets).items() if k.startswith("loss_")).backward()

    pieces = new.layers_cost_pieces(layers, targets)
    cost, sizes = sum(pieces.values()).cpu(), [len(t["boxes"]) for t in targets] * len(layers)
    runs = {"match_old": lambda: old.match_layers(layers, targets), "match_new": lambda: new.match_layers(layers, targets),
            "criterion_old": lambda: step(criteria["old"]), "criterion_new": lambda: step(criteria["new"]),
            "solve_serial": lambda: solve_padded(cost, sizes), "solve_pool": lambda: solve_padded(cost, sizes, pool=True)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(rounds):  # interleaved, so load changes of a shared machine hit all
        for name, fn in runs.items():
            if round_index == 0:
                fn()  # warm-up
            times[name].append(timed_ms(fn, device, steps))
    result = {"same_assignment": same, **{name: statistics.median(v) for name, v in times.items()},
              "ms_rounds": times}
    result["match_speedup"] = result["match_old"] / result["match_new"]
    result["criterion_speedup"] = result["criterion_old"] / result["criterion_new"]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for matching.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians)")
    parser.add_argument("--steps", type=int, default=3, help="calls per timing")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    report = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": platform.processor(), "cases": {}}
    for name in args.cases:
        report["cases"][name] = {"case": CASES[name], **bench_case(CASES[name], device, args.rounds, args.steps)}
        print(name, json.dumps(report["cases"][name]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "matching.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
