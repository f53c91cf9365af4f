"""`detrforge sweep`: one stage of a pipeline over a grid of overrides (and seeds).

```
detrforge sweep PIPELINE --stage detr --grid optim.lr=1e-4,2e-4 --grid criterion.matcher.cost_class=1,2
                [--seeds 0,1] [--cluster C.yaml] [--max-parallel N] [--promote-best ALIAS]
```

Each point of the grid is a stage instance of the pipeline, named after the swept values
(``detr.lr_1e-4_cost_class_1``, plus ``_s<seed>`` with seeds), with its own run folder next to
the pipeline's stages, so it is cached, resumed and registered like any stage: a second sweep
skips the finished points. The stages the swept one reads (``stage:backbone``) are run first
when they are not done. Points run one after another here, or as one SLURM job array
(``--cluster``, at most ``--max-parallel`` at once). Every point is a child of one MLflow parent
run (kept across calls in ``sweep.json``), so its overrides are among its params. At the end:
``<workdir>/<pipeline>/sweeps/<stage>/`` holds ``table.md`` (points sorted by the stage's main
metric, higher first), ``sweep.json`` and ``sweep.png`` (the metric against each swept value);
``--promote-best ALIAS`` points ALIAS of the best point's registered model at its version.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launch.executors import folder_lock, load_cluster_config, make_executor
from launch.graph import (
    Pipeline,
    StageSpec,
    _stage_spec,
    is_up_to_date,
    load_target,
    prepare_run_dir,
    seed_instances,
    stage_inputs,
)
from launch.runner import run_one_stage
from pipeline.atomic import write_json_atomic
from pipeline.config import ConfigError
from stages.common import read_done

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class Point:
    """One point of the grid: its stage instance and the overrides that make it."""

    spec: StageSpec
    values: dict[str, str]  # swept key -> value text, e.g. {"optim.lr": "1e-4"}
    seed: int | None


def parse_grid(grid: list[str]) -> dict[str, list[str]]:
    """``["optim.lr=1e-4,2e-4"]`` -> ``{"optim.lr": ["1e-4", "2e-4"]}``."""
    out: dict[str, list[str]] = {}
    for item in grid:
        key, sep, values = item.partition("=")
        texts = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not texts:
            raise ConfigError(f"--grid {item!r}: write KEY=V1,V2,... (e.g. optim.lr=1e-4,2e-4)")
        if key in out:
            raise ConfigError(f"--grid {key} is given twice; list all its values in one --grid")
        if len(set(texts)) != len(texts):
            raise ConfigError(f"--grid {item!r}: a value is repeated")
        out[key] = texts
    if not out:
        raise ConfigError("a sweep needs at least one --grid KEY=V1,V2,...")
    return out


def parse_seeds(text: str | None) -> list[int | None]:
    if not text:
        return [None]
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: write integers, e.g. --seeds 0,1") from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds {text!r}: distinct integers >= 0")
    return list(seeds)


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each key's last part (``optim.lr`` -> ``lr``) unless two keys share it: then the key."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: (part if last.count(part) == 1 else key) for key, part in zip(keys, last)}


def point_name(stage: str, values: dict[str, str]) -> str:
    """``detr`` + {lr: 1e-4, cost_class: 1} -> ``detr.lr_1e-4_cost_class_1`` (the name rule;
    seeds add ``_s<seed>`` as in pipeline files)."""
    short = short_keys(list(values))
    text = "_".join(f"{short[key]}_{value}" for key, value in values.items())
    return _UNSAFE.sub("_", f"{stage}.{text}")


def _raw_entry(pipeline: Pipeline, stage: str) -> dict:
    """The pipeline file's entry for ``stage`` (or the one-stage entry of a recipe)."""
    data = yaml.safe_load(pipeline.path.read_text()) or {}
    if not isinstance(data, dict) or "stages" not in data:
        return {"name": pipeline.path.stem, "recipe": pipeline.path.name}
    for entry in data["stages"]:
        if entry.get("name") == stage:
            return dict(entry)
    names = ", ".join(str(e.get("name")) for e in data["stages"])
    raise ConfigError(f"{pipeline.path}: no stage named '{stage}' to sweep (stages: {names})")


def upstream(pipeline: Pipeline, stage: str) -> list[StageSpec]:
    """The earlier stages the swept stage reads, transitively, in pipeline order."""
    needed = set(pipeline.instances(stage)[0].depends_on)
    for spec in reversed(pipeline.stages):
        if spec.name in needed:
            needed |= set(spec.depends_on)
    return [spec for spec in pipeline.stages if spec.name in needed]


def build_points(pipeline: Pipeline, stage: str, grid: dict[str, list[str]],
                 seeds: list[int | None], overrides: list[str]) -> list[Point]:
    entry = _raw_entry(pipeline, stage)
    seeds = seeds if seeds != [None] or not entry.get("seeds") else list(entry["seeds"])
    entry.pop("seeds", None)
    earlier = [s.name for s in upstream(pipeline, stage)]
    points, names = [], set()
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        point = {**entry, "name": point_name(stage, values),
                 "overrides": [*(entry.get("overrides") or []),
                               *(f"{k}={v}" for k, v in values.items())]}
        if seeds != [None]:  # the pipeline file's own rule: <name>_s<seed> with train.seed set
            point["seeds"] = seeds
        for point_entry, seed in seed_instances(point, f"{pipeline.path}: sweep"):
            name = point_entry["name"]
            if name in names or name in {s.name for s in pipeline.stages}:
                raise ConfigError(f"sweep point name {name!r} is not unique; sweep values that "
                                  "differ after '_' replaces characters other than [A-Za-z0-9_.-]")
            names.add(name)
            spec = _stage_spec(pipeline.path, point_entry, overrides, earlier,
                               f"{pipeline.path}: sweep point {name}")
            spec.group, spec.seed = stage, seed
            points.append(Point(spec, values, seed))
    return points


def sweep_folder(pipeline: Pipeline, workdir: Path, stage: str) -> Path:
    return Path(workdir) / pipeline.name / "sweeps" / stage


def _parent(pipeline: Pipeline, spec: StageSpec, workdir: Path, stage: str,
            grid: dict[str, list[str]]):
    """The sweep's MLflow parent run, the same one on every call (id kept in sweep.json)."""
    from pipeline.tracking import start_parent_run

    tracking = getattr(spec.cfg, "tracking", None)
    if tracking is None or not tracking.enabled:
        return None
    record = sweep_folder(pipeline, workdir, stage) / "sweep.json"
    previous = json.loads(record.read_text()).get("parent_run_id") if record.is_file() else None
    parent = start_parent_run(tracking, workdir, 0, f"{pipeline.name}.sweep.{stage}",
                              resume_run_id=previous, tags={"detrforge.kind": "sweep"})
    parent.log_params({f"sweep.{key}": ",".join(values) for key, values in grid.items()})
    return parent


def run_sweep(target: str | Path, stage: str, grid_args: list[str], workdir: Path,
              overrides: list[str] | None = None, seeds: str | None = None,
              cluster: Path | None = None, max_parallel: int | None = None,
              promote_best: str | None = None) -> int:
    """`detrforge sweep`: run (or submit and wait for) every point not done; report."""
    pipeline = load_target(target, list(overrides or []))
    grid = parse_grid(grid_args)
    points = build_points(pipeline, stage, grid, parse_seeds(seeds), list(overrides or []))
    if max_parallel is not None and max_parallel < 1:
        raise ConfigError(f"--max-parallel must be >= 1, got {max_parallel}")
    sweep = Pipeline(pipeline.name, pipeline.path,
                     [*upstream(pipeline, stage), *(p.spec for p in points)])
    workdir = Path(workdir).resolve()
    with folder_lock(workdir / pipeline.name, "detrforge sweep"):
        parent = _parent(pipeline, points[0].spec, workdir, stage, grid)
        parent_id = parent.run_id if parent else None
        if not _run_upstream(sweep, upstream(pipeline, stage), workdir, parent_id, cluster):
            return 1
        todo = [p for p in points if not is_up_to_date(sweep, p.spec, workdir)]
        print(f"sweep {pipeline.name}.{stage}: {len(points)} points, "
              f"{len(points) - len(todo)} done, {len(todo)} to run", flush=True)
        for point in todo:
            with folder_lock(sweep.run_dir(workdir, point.spec.name), "detrforge sweep"):
                prepare_run_dir(sweep, point.spec, workdir, force=False)
        if cluster is not None:
            _submit_array(sweep, todo, workdir, parent_id, cluster, max_parallel)
        else:
            for point in todo:
                result = run_one_stage(sweep, point.spec, workdir, parent_id)
                if result["status"] != "done":
                    print(f"  {point.spec.name}: {result['status']} (exit code "
                          f"{result.get('exit_code', 0)})", flush=True)
        rows = report(sweep, stage, points, grid, workdir, parent_id)
        if parent is not None:
            folder = sweep_folder(pipeline, workdir, stage)
            for name in ("table.md", "sweep.json", "sweep.png"):
                if (folder / name).is_file():
                    parent.log_artifact(folder / name)
            parent.finish("FINISHED" if all(r["status"] == "done" for r in rows) else "FAILED")
    if promote_best:
        _promote(sweep, points[0].spec, rows, promote_best, workdir)
    return 0 if all(r["status"] == "done" for r in rows) else 1


def _run_upstream(sweep: Pipeline, specs: list[StageSpec], workdir: Path,
                  parent_id: str | None, cluster: Path | None) -> bool:
    for spec in specs:
        if is_up_to_date(sweep, spec, workdir):
            continue
        if cluster is not None:
            raise ConfigError(f"stage {spec.name}, which the swept stage reads, is not done: "
                              "run or submit the pipeline up to it first")
        prepare_run_dir(sweep, spec, workdir, force=False)
        if run_one_stage(sweep, spec, workdir, parent_id)["status"] != "done":
            print(f"sweep: stage {spec.name} failed; no point was run")
            return False
    return True


def _submit_array(sweep: Pipeline, todo: list[Point], workdir: Path, parent_id: str | None,
                  cluster_file: Path, max_parallel: int | None) -> None:
    """Every point as one task of a SLURM job array; waits until all have ended."""
    from launch.job import StageJob
    from launch.slurm_submit import stage_cluster
    from launch.stage_main import stage_spec

    if not todo:
        return
    cluster = load_cluster_config(cluster_file)
    executor = make_executor("slurm", workdir / sweep.name / ".submitit" / "%j",
                             stage_cluster(cluster, todo[0].spec),
                             job_name=f"{sweep.name}.sweep.{todo[0].spec.group}")
    executor.update_parameters(slurm_array_parallelism=max_parallel or len(todo))
    with executor.batch():
        jobs = [executor.submit(StageJob(
            "launch.stage_main:run_stage",
            {"spec": stage_spec(sweep, p.spec, workdir, parent_id)},
            sweep.run_dir(workdir, p.spec.name), cluster.max_requeues)) for p in todo]
    print(f"submitted job array {jobs[0].job_id.split('_')[0]} ({len(jobs)} tasks, at most "
          f"{max_parallel or len(todo)} at once); waiting", flush=True)
    for point, job in zip(todo, jobs):
        try:
            job.results()
        except Exception as err:  # noqa: BLE001 - a failed point is reported in the table
            print(f"  {point.spec.name}: job {job.job_id} failed: {str(err).splitlines()[-1:]}")


def report(sweep: Pipeline, stage: str, points: list[Point], grid: dict[str, list[str]],
           workdir: Path, parent_id: str | None) -> list[dict[str, Any]]:
    """table.md, sweep.json and sweep.png; returns the rows, best first."""
    rows = []
    for point in points:
        done = read_done(sweep.run_dir(workdir, point.spec.name)) or {}
        key = done.get("main_metric", "")
        value = (done.get("metrics") or {}).get(key)
        rows.append({"point": point.spec.name, "values": point.values, "seed": point.seed,
                     "status": point_status(sweep, point.spec, workdir, done),
                     "main_metric": key, "value": value,
                     "model_version": done.get("model_version")})
    rows.sort(key=lambda r: (r["value"] is None, -(r["value"] or 0.0), r["point"]))
    folder = sweep_folder(sweep, workdir, stage)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "sweep.json", {"stage": stage, "grid": grid, "rows": rows,
                                              "parent_run_id": parent_id})
    table = _table(rows, list(grid))
    (folder / "table.md").write_text(table)
    _plot(rows, list(grid), folder / "sweep.png")
    print(table, end="")
    print(f"sweep report: {folder}")
    return rows


def point_status(sweep: Pipeline, spec: StageSpec, workdir: Path, done: dict) -> str:
    """"done" by the stage cache's own rule (what the next call skips), else why not."""
    if not done:
        return "failed"
    if is_up_to_date(sweep, spec, workdir):
        return "done"
    if done.get("config_hash") != spec.config_hash:
        return "failed (DONE.json is for another config)"
    changed = sorted(k for k, v in stage_inputs(sweep, spec, workdir).items()
                     if (done.get("inputs") or {}).get(k) != v)
    return f"failed (inputs changed: {', '.join(changed)})" if changed else "failed (export changed)"


def _table(rows: list[dict], keys: list[str]) -> str:
    metric = next((r["main_metric"] for r in rows if r["main_metric"]), "metric")
    head = ["point", *keys, "seed", metric, "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        value = f"{row['value']:.4f}" if isinstance(row["value"], (int, float)) else "-"
        cells = [row["point"], *(row["values"][k] for k in keys),
                 "-" if row["seed"] is None else str(row["seed"]), value, row["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], keys: list[str], path: Path) -> None:
    """One panel per swept key: the main metric of every finished point against that value."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    done = [r for r in rows if isinstance(r["value"], (int, float))]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = sorted({r["values"][key] for r in rows}, key=_sort_key)
        for row in done:
            ax.scatter(values.index(row["values"][key]), row["value"], color="tab:blue")
        ax.set_xticks(range(len(values)), values)
        ax.set_xlabel(key)
        ax.set_ylabel(next((r["main_metric"] for r in rows if r["main_metric"]), "metric"))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _sort_key(text: str) -> tuple[int, float | str]:
    try:
        return (0, float(text))
    except ValueError:
        return (1, text)


def _promote(sweep: Pipeline, spec: StageSpec, rows: list[dict], alias: str,
             workdir: Path) -> None:
    from pipeline.registry import promote
    from pipeline.tracking import tracking_uri_for

    best = next((r for r in rows if r["status"] == "done" and r["model_version"]), None)
    if best is None:
        raise ConfigError(f"--promote-best {alias}: no finished point has a registered version")
    name = f"{sweep.name}.{best['point']}"
    promote(tracking_uri_for(workdir, spec.cfg.tracking), name, best["model_version"], alias)
    print(f"{name}@{alias} -> version {best['model_version']} (best {best['main_metric']})")
