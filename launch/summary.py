"""What `detrforge run` writes to the pipeline folder when it ends: the summary and the curves.

``summary.md`` / ``summary.json``: every stage's final numbers, then, for a seeded stage
(``seeds:`` in the pipeline file), one more row with the mean ± std over its seeds' finished
instances. ``curves.md|json|png`` (launch/curves.py): every evaluation against steps.
"""

from __future__ import annotations

import json
from pathlib import Path

from launch.curves import GroupCurves, group_curves, mean_std, write_curves
from launch.graph import Pipeline

SUMMARY_METRICS = ("top1", "top5", "AP", "AP50", "APs", "APm", "APl", "PQ", "mIoU", "segm_AP")


def seed_rows(pipeline: Pipeline, rows: list[dict]) -> list[dict]:
    """One row per seeded stage with finished instances: mean and std of each summary metric
    over them (``metrics`` holds the means, ``metrics_std`` the sample standard deviations)."""
    by_stage = {row["stage"]: row for row in rows}
    out = []
    for group, specs in pipeline.groups().items():
        if all(spec.seed is None for spec in specs):
            continue
        done = [by_stage[s.name] for s in specs
                if s.name in by_stage and by_stage[s.name].get("metrics")]
        if not done:
            continue
        keys = [m for m in SUMMARY_METRICS if all(m in row["metrics"] for row in done)]
        stats = {m: mean_std(row["metrics"][m] for row in done) for m in keys}
        out.append({"stage": f"{group} (mean ± std)", "status": f"{len(done)}/{len(specs)} seeds",
                    "group": group, "seeds": [s.seed for s in specs if s.name in
                                              {r["stage"] for r in done}],
                    "metrics": {m: v[0] for m, v in stats.items()},
                    "metrics_std": {m: v[1] for m, v in stats.items()},
                    "main_metric": done[0].get("main_metric", "")})
    return out


def write_summary(pipeline: Pipeline, rows: list[dict], workdir: Path) -> Path:
    """summary.md (a table of every stage's main numbers, then the seeded stages' mean ± std)
    + summary.json (the same rows) in the pipeline folder."""
    folder = Path(workdir) / pipeline.name
    folder.mkdir(parents=True, exist_ok=True)
    rows = rows + seed_rows(pipeline, rows)
    shown = [m for m in SUMMARY_METRICS if any(m in (r.get("metrics") or {}) for r in rows)]
    lines = ["| stage | status | " + " | ".join(shown) + " |",
             "|---|---|" + "---|" * len(shown)]
    for row in rows:
        metrics, std = row.get("metrics") or {}, row.get("metrics_std")
        cells = [("-" if m not in metrics else f"{metrics[m]:.3f}" if std is None
                  else f"{metrics[m]:.3f} ± {std[m]:.3f}") for m in shown]
        lines.append(f"| {row['stage']} | {row['status']} | " + " | ".join(cells) + " |")
    table = folder / "summary.md"
    table.write_text("\n".join(lines) + "\n")
    (folder / "summary.json").write_text(json.dumps(rows, indent=2, default=str))
    return table


def pipeline_curves(pipeline: Pipeline, workdir: Path) -> dict[str, GroupCurves]:
    """Every stage's evaluation curves, a seeded stage's instances aggregated."""
    return {group: group_curves({s.name: pipeline.run_dir(workdir, s.name) for s in specs},
                                {s.name: s.seed for s in specs})
            for group, specs in pipeline.groups().items()}


def write_reports(pipeline: Pipeline, rows: list[dict], workdir: Path) -> list[Path]:
    """The summary and the curves; the files to log to the pipeline's MLflow run."""
    table = write_summary(pipeline, rows, workdir)
    curves = write_curves(Path(workdir) / pipeline.name, pipeline_curves(pipeline, workdir))
    return [table, table.with_suffix(".json"), *curves]
