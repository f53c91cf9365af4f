"""Pipeline files: stages in order, their recipes, overrides and inputs; the stage cache.

```yaml
name: demo
stages:
  - name: backbone
    recipe: ../stages/backbone_pretrain/tiny.yaml      # relative to this file
  - name: detr
    recipe: ../stages/detr_pretrain/tiny.yaml
    overrides: [backbone_init=stage:backbone]           # stage:<name> = that stage's export
    processes: 2                                        # optional: ranks on the local machine
  - name: dino
    recipe: ../stages/detr_pretrain/tiny_dino.yaml
    seeds: [0, 1]                                       # optional: one stage per seed
```

Relative paths (``recipe:``, and path values in ``overrides:`` such as ``data.shards=...``) are
relative to the pipeline file; overrides given on the command line are relative to the current
folder. Both are made absolute here, so a pipeline means the same from any working folder.

A stage depends on every stage its resolved config names as ``stage:<name>``; those must come
earlier in the file. A stage is up to date when its ``DONE.json`` records the same config hash
and the same input fingerprints (exports' weights and the data's shard index), as ``make``
skips a built target.

``seeds: [0, 1]`` expands a stage into one stage per seed, named ``<name>_s<seed>`` (``dino_s0``,
``dino_s1``), each with ``train.seed=<seed>`` after its other overrides: each has its own run
folder and is cached, resumed and selected (``--only dino_s1``) like any stage; ``--only dino``
selects all of them. A dependant names one instance (``stage:dino_s0``): ``stage:dino`` is an
error, since which seed's export a later stage starts from is a choice the pipeline file makes.
The summary and the curves aggregate a seeded stage's instances as mean +- std over its seeds.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError, absolutize_overrides, config_hash, to_dict
from pipeline.run_folder import RunFolder
from stages import load_stage_config, recipe_kind, stage_module
from stages.common import read_done
from stages.inputs import STAGE_PREFIX, export_is_intact, input_fingerprints

PIPELINE_KEYS = {"name", "stages", "description"}
STAGE_KEYS = {"name", "recipe", "overrides", "processes", "seeds"}
# A name starts with a letter or digit, so '.' and '..' are not names.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class StageSpec:
    """One stage of a pipeline, resolved."""

    name: str
    recipe: Path
    kind: str
    overrides: list[str]
    cfg: Any  # the stage's validated Config
    processes: int
    depends_on: list[str] = field(default_factory=list)
    group: str = ""  # the pipeline file's stage name (a seeded stage's instances share it)
    seed: int | None = None  # the `seeds:` entry this instance runs, None for an unseeded stage

    @property
    def config_hash(self) -> str:
        return config_hash(self.cfg)


@dataclass
class Pipeline:
    name: str
    path: Path
    stages: list[StageSpec]

    def stage(self, name: str) -> StageSpec:
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise ConfigError(f"{self.path}: no stage named '{name}' "
                          f"(stages: {', '.join(s.name for s in self.stages)})")

    def instances(self, name: str) -> list[StageSpec]:
        """The stage called `name`, or every seed instance of the seeded stage `name`."""
        seeded = [spec for spec in self.stages if spec.seed is not None and spec.group == name]
        return seeded or [self.stage(name)]

    def groups(self) -> dict[str, list[StageSpec]]:
        """Stage instances by their pipeline-file name, in file order (one each when unseeded)."""
        out: dict[str, list[StageSpec]] = {}
        for spec in self.stages:
            out.setdefault(spec.group or spec.name, []).append(spec)
        return out

    def run_dir(self, workdir: Path, stage: str) -> Path:
        return Path(workdir) / self.name / stage


def _stage_refs(data: Any) -> list[str]:
    """Every ``stage:<name>`` string inside a config's plain data."""
    if isinstance(data, dict):
        return [ref for value in data.values() for ref in _stage_refs(value)]
    if isinstance(data, list):
        return [ref for value in data for ref in _stage_refs(value)]
    if isinstance(data, str) and data.startswith(STAGE_PREFIX):
        return [data[len(STAGE_PREFIX):]]
    return []


def _check_keys(entry: dict, allowed: set[str], where: str) -> None:
    import difflib

    for key in entry:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (keys: {', '.join(sorted(allowed))})"
            raise ConfigError(f"{where}: unknown key '{key}'{hint}")


def load_pipeline(path: str | Path, extra_overrides: list[str] | None = None) -> Pipeline:
    """Read and validate a pipeline file; every stage's recipe is resolved now, so a typo in
    stage 3 fails before stage 1 trains. ``extra_overrides`` apply to every stage."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
        raise ConfigError(f"{path}: a pipeline needs 'name' and a list 'stages'")
    _check_keys(data, PIPELINE_KEYS, str(path))
    name = check_name(str(data.get("name") or path.stem), "pipeline name", str(path))
    specs: list[StageSpec] = []
    for index, entry in enumerate(data["stages"]):
        where = f"{path}: stages[{index}]"
        if not isinstance(entry, dict) or "name" not in entry or "recipe" not in entry:
            raise ConfigError(f"{where}: each stage needs 'name' and 'recipe'")
        _check_keys(entry, STAGE_KEYS, where)
        seeded = [s for s in specs if s.seed is not None]
        for instance, seed in seed_instances(entry, where):
            spec = _stage_spec(path, instance, extra_overrides or [], [s.name for s in specs],
                               where, seeded)
            spec.group, spec.seed = str(entry["name"]), seed
            specs.append(spec)
    names = [s.name for s in specs]
    for spec in specs:
        if names.count(spec.name) > 1:
            raise ConfigError(f"{path}: two stages are named '{spec.name}' (a seeded stage "
                              "'<name>' makes '<name>_s<seed>'): rename one")
    return Pipeline(name, path, specs)


def seed_instances(entry: dict, where: str) -> list[tuple[dict, int | None]]:
    """The entry itself, or one copy per seed named `<name>_s<seed>` with `train.seed=<seed>`
    appended to its overrides (so it wins over the entry's own)."""
    seeds = entry.get("seeds")
    if seeds is None:
        return [(entry, None)]
    if (not isinstance(seeds, list) or not seeds or len(set(map(str, seeds))) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ConfigError(f"{where} ('{entry['name']}'): seeds must be a non-empty list of "
                          f"distinct integers >= 0, e.g. seeds: [0, 1]; got {seeds!r}")
    return [({**entry, "name": f"{entry['name']}_s{seed}",
              "overrides": [*(entry.get("overrides") or []), f"train.seed={seed}"]}, seed)
            for seed in seeds]


def load_target(target: str | Path, overrides: list[str]) -> Pipeline:
    """A pipeline file, or a single stage recipe run as a one-stage pipeline named after it."""
    target = Path(target)
    if not target.is_file():
        raise ConfigError(f"not found: {target}")
    try:
        data = yaml.safe_load(target.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{target}: not valid YAML: {' '.join(str(err).split())}") from None
    if isinstance(data, dict) and "stages" in data:
        return load_pipeline(target, overrides)
    entry = {"name": target.stem, "recipe": target.name}
    return Pipeline(target.stem, target, [_stage_spec(target, entry, overrides, [], str(target))])


def check_name(name: str, what: str, where: str) -> str:
    """Pipeline and stage names become folders, MLflow names and SLURM job names: identifiers
    only (no '/', '..', spaces or control characters)."""
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"{where}: {what} {name!r} is not a valid name: use letters, digits, "
                          "'_', '.' and '-', starting with a letter or digit")
    return name


def _stage_spec(path: Path, entry: dict, extra: list[str], earlier: list[str], where: str,
                seeded: list[StageSpec] = ()) -> StageSpec:
    check_name(str(entry["name"]), "stage name", where)
    recipe = (path.parent / entry["recipe"]).resolve()
    schema = stage_module(recipe_kind(recipe)).Config
    overrides = (absolutize_overrides([str(o) for o in entry.get("overrides") or []], schema,
                                      path.resolve().parent)
                 + absolutize_overrides(list(extra), schema, Path.cwd()))
    kind, cfg = load_stage_config(recipe, overrides)
    refs = sorted(set(_stage_refs(to_dict(cfg))))
    for ref in refs:
        instances = [s.name for s in seeded if s.group == ref]
        if instances and ref not in earlier:
            raise ConfigError(f"{where} ('{entry['name']}'): stage:{ref} is a seeded stage; name "
                              f"one of its instances instead ({', '.join(instances)})")
        if ref not in earlier:
            raise ConfigError(f"{where} ('{entry['name']}'): input stage:{ref} is not an earlier "
                              f"stage of this pipeline (earlier: {', '.join(earlier) or 'none'})")
    processes = int(entry.get("processes") or cfg.train.processes)
    return StageSpec(entry["name"], recipe, kind, overrides, cfg, processes, refs)


def stage_inputs(pipeline: Pipeline, spec: StageSpec, workdir: Path) -> dict[str, str]:
    """Fingerprints of what a stage reads (exports, path and models:/ inputs, data, ranks)."""
    return input_fingerprints(workdir, pipeline.name, spec.depends_on, data_shards(spec.cfg),
                              cfg=spec.cfg, processes=spec.processes)


def data_shards(cfg: Any) -> str | None:
    data = getattr(cfg, "data", None)
    return getattr(data, "shards", None) if data is not None else None


def is_up_to_date(pipeline: Pipeline, spec: StageSpec, workdir: Path) -> bool:
    """DONE.json matches this config and these inputs, and the export it vouches for is still
    there with the weights its meta.json recorded (a deleted or replaced export = not done)."""
    run_dir = pipeline.run_dir(workdir, spec.name)
    done = read_done(run_dir)
    if done is None or done.get("config_hash") != spec.config_hash:
        return False
    return (done.get("inputs") == stage_inputs(pipeline, spec, workdir)
            and export_is_intact(RunFolder(run_dir).export_dir))


def _archive(run_dir: Path, why: str) -> None:
    """Move an outdated run folder aside (never delete work)."""
    archive = run_dir.parent / ".archive" / f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    archive.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run_dir), str(archive))
    print(f"[{run_dir.name}] {why}: previous run folder moved to {archive}")


def prepare_run_dir(pipeline: Pipeline, spec: StageSpec, workdir: Path, force: bool) -> None:
    """Keep a run folder that this config can resume; archive one written for another config
    (the local executor and SLURM submission both call it before a stage starts)."""
    run_dir = pipeline.run_dir(workdir, spec.name)
    if not run_dir.exists():
        return
    if force:
        _archive(run_dir, "--force")
    elif read_done(run_dir) is not None:
        _archive(run_dir, "config or inputs changed since it finished")
    elif recorded_hash(run_dir) not in (None, spec.config_hash):
        _archive(run_dir, "config changed since the interrupted run")


def recorded_hash(run_dir: Path) -> str | None:
    """The config hash written at the top of a run folder's config.yaml, if any."""
    config = RunFolder(run_dir).config_path
    if not config.is_file():
        return None
    first = config.read_text().split("\n", 1)[0]
    return first.split(":", 1)[1].strip() if first.startswith("# config_hash:") else None


def stage_status(pipeline: Pipeline, spec: StageSpec, workdir: Path) -> dict[str, Any]:
    """Where a stage stands: done / up to date, partial (last checkpoint step), not started."""
    run_dir = pipeline.run_dir(workdir, spec.name)
    done = read_done(run_dir)
    latest = RunFolder(run_dir).latest_path
    step = None
    if latest.is_file():
        step = latest.read_text().strip().rsplit("_", 1)[-1]
    metrics_file = RunFolder(run_dir).metrics_path
    last_metrics = {}
    if metrics_file.is_file():
        last_metrics = _last_record(metrics_file)
    if done is not None:
        state = "done" if is_up_to_date(pipeline, spec, workdir) else "outdated"
    elif step is not None:
        state = "partial"
    else:
        state = "not started"
    return {"stage": spec.name, "state": state, "checkpoint_step": step,
            "max_steps": spec.cfg.train.max_steps, "done": done, "last_metrics": last_metrics}


def _last_record(path: Path) -> dict[str, Any]:
    """The last complete line of a JSON-lines log (a kill mid-append leaves a partial one)."""
    for line in reversed(path.read_text(errors="replace").strip().splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        return record if isinstance(record, dict) else {}
    return {}
