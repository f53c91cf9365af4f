"""A pipeline's learning curves: each stage's evaluations against steps, mean +- std over seeds.

Every evaluation a stage runs (``train.eval_every`` and the final one) is a line of its run
folder's metrics log with ``eval/<metric>`` keys (``eval_raw/<metric>`` for the training weights
of an EMA run). This module reads them back for every stage of a pipeline, groups a seeded stage's
instances (``dino_s0``, ``dino_s1`` -> ``dino``), and writes to the pipeline folder:

    curves.json   {"groups": {group: {"seeds", "stages", "step_time_s", "curves": {key: [
                  {"step", "mean", "std", "n"}, ...]}}}}
    curves.md     one table per metric: a row per step, a column per stage, "mean ± std"
    curves.png    the same as a plot: a panel per metric, a line per stage (± std band)

``std`` is the sample standard deviation over the seeds that reached that step (0 for one seed).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.run_folder import RunFolder

# The metrics drawn, in this order, when a stage logs them (detectors: AP, AP50, APs; the
# classification, segmentation and domain stages: their main metrics).
CURVE_METRICS = ("AP", "AP50", "APs", "top1", "PQ", "mIoU", "segm_AP")
EVAL_PREFIXES = ("eval", "eval_raw")  # eval_raw: the training weights of an EMA run
STEP_TIME_KEY = "train/step_time_s"
CURVES_FILES = ("curves.md", "curves.json", "curves.png")


@dataclass
class Point:
    step: int
    mean: float
    std: float
    n: int  # seeds that reached this step


@dataclass
class GroupCurves:
    """One pipeline-file stage: its instances' curves aggregated over seeds."""

    stages: list[str]
    seeds: list[int | None]
    curves: dict[str, list[Point]] = field(default_factory=dict)  # "eval/AP" -> points
    step_time_s: float | None = None  # mean over seeds of each run's median step time


def read_eval_points(metrics_path: str | Path) -> dict[str, dict[int, float]]:
    """``{"eval/AP": {step: value}}`` of one metrics log, for the metrics drawn.

    A line cut by a kill is skipped; a step logged twice (a resumed run re-evaluates) keeps the
    last value; COCO's -1 ("no objects of this size") is not a point.
    """
    wanted = {f"{prefix}/{m}" for prefix in EVAL_PREFIXES for m in CURVE_METRICS}
    points: dict[str, dict[int, float]] = {}
    for record in _records(metrics_path):
        for key, value in (record.get("metrics") or {}).items():
            if key in wanted and _is_number(value) and value >= 0:
                points.setdefault(key, {})[int(record["step"])] = float(value)
    return points


def median_step_time(metrics_path: str | Path) -> float | None:
    """The median logged seconds per optimizer step of a run, or None."""
    times = [float(r["metrics"][STEP_TIME_KEY]) for r in _records(metrics_path)
             if _is_number((r.get("metrics") or {}).get(STEP_TIME_KEY))]
    return statistics.median(times) if times else None


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    if not values:
        raise ValueError("curves.py mean_std: no values")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def group_curves(runs: Mapping[str, Path], seeds: Mapping[str, int | None]) -> GroupCurves:
    """Aggregate the run folders of one group (stage name -> run folder) step by step."""
    per_run = {name: read_eval_points(RunFolder(folder).metrics_path)
               for name, folder in runs.items()}
    group = GroupCurves(stages=list(runs), seeds=[seeds.get(name) for name in runs])
    keys = {key for points in per_run.values() for key in points}
    for key in sorted(keys, key=_key_order):
        steps = sorted({step for points in per_run.values() for step in points.get(key, {})})
        group.curves[key] = [
            Point(step, *mean_std(vals), len(vals)) for step in steps
            for vals in [[p[key][step] for p in per_run.values() if step in p.get(key, {})]]]
    times = [t for folder in runs.values()
             if (t := median_step_time(RunFolder(folder).metrics_path)) is not None]
    group.step_time_s = statistics.fmean(times) if times else None
    return group


def write_curves(folder: Path, groups: Mapping[str, GroupCurves]) -> list[Path]:
    """curves.json, curves.md and (when there is a point) curves.png in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {"groups": {name: {"stages": g.stages, "seeds": g.seeds, "step_time_s": g.step_time_s,
                              "curves": {k: [vars(p) for p in pts] for k, pts in g.curves.items()}}
                       for name, g in groups.items()}}
    written = [folder / "curves.json", folder / "curves.md"]
    written[0].write_text(json.dumps(data, indent=2) + "\n")
    written[1].write_text(curves_markdown(groups))
    if any(g.curves for g in groups.values()):
        plot_curves(groups, folder / "curves.png")
        written.append(folder / "curves.png")
    return written


def curves_markdown(groups: Mapping[str, GroupCurves]) -> str:
    """A table per metric: steps down, stages across, mean ± std (n seeds in the header)."""
    lines = []
    keys = sorted({k for g in groups.values() for k in g.curves}, key=_key_order)
    for key in keys:
        names = [n for n, g in groups.items() if key in g.curves]
        steps = sorted({p.step for n in names for p in groups[n].curves[key]})
        lines += [f"### {_label(key)} against steps", "",
                  "| step | " + " | ".join(f"{n} ({_seed_text(groups[n])})" for n in names) + " |",
                  "|---|" + "---|" * len(names)]
        for step in steps:
            cells = [_cell(groups[n].curves[key], step) for n in names]
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
        lines.append("")
    timed = [(n, g.step_time_s) for n, g in groups.items() if g.step_time_s is not None]
    if timed:
        lines += ["### Wall time per step (median of each run, mean over seeds)", "",
                  "| stage | s/step |", "|---|---|"]
        lines += [f"| {n} | {t:.3f} |" for n, t in timed] + [""]
    return "\n".join(lines) if lines else "No evaluations logged yet.\n"


def plot_curves(groups: Mapping[str, GroupCurves], path: Path) -> None:
    """A panel per metric (training-weight curves dashed in their metric's panel)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    metrics = [m for m in CURVE_METRICS
               if any(f"{p}/{m}" in g.curves for g in groups.values() for p in EVAL_PREFIXES)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes[0], metrics, strict=True):
        for index, (name, group) in enumerate(groups.items()):
            for prefix, style in (("eval", "-"), ("eval_raw", "--")):
                points = group.curves.get(f"{prefix}/{metric}")
                if points:
                    _draw(ax, points, colors[index % len(colors)], style,
                          name if prefix == "eval" else f"{name} (no EMA)")
        ax.set(title=metric, xlabel="step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _draw(ax, points: list[Point], color: str, style: str, label: str) -> None:
    steps = [p.step for p in points]
    means = [p.mean for p in points]
    ax.plot(steps, means, style, color=color, marker=".", label=label)
    if any(p.std > 0 for p in points):
        ax.fill_between(steps, [p.mean - p.std for p in points],
                        [p.mean + p.std for p in points], color=color, alpha=0.15)


def _cell(points: list[Point], step: int) -> str:
    for p in points:
        if p.step == step:
            return f"{p.mean:.3f} ± {p.std:.3f}" if p.n > 1 else f"{p.mean:.3f}"
    return "-"


def _seed_text(group: GroupCurves) -> str:
    n = len(group.stages)
    return f"{n} seeds" if n > 1 else "1 run"


def _label(key: str) -> str:
    prefix, metric = key.split("/", 1)
    return metric if prefix == "eval" else f"{metric}, training weights (no EMA)"


def _key_order(key: str) -> tuple[int, int]:
    prefix, metric = key.split("/", 1)
    return CURVE_METRICS.index(metric), EVAL_PREFIXES.index(prefix)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _records(path: str | Path) -> Iterable[dict]:
    path = Path(path)
    if not path.is_file():
        return
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if isinstance(record, dict) and _is_number(record.get("step")):
            yield record
