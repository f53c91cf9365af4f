"""`detrforge finetune`: a user's COCO train/val folders -> a fine-tuned, evaluated, registered
detector, in one command.

A thin front over the existing machinery: the data-set doctor, the COCO converter (cached by
the inputs' content hash), the schedule and class-mapping rules of ``pipeline.finetune_*``, then
a generated pipeline file run by ``launch.runner.run_target`` (or submitted with ``--cluster``)
like any other. What it writes, under ``<workdir>/<name>/``:

    pipeline.yaml         one stage, `finetune`, of kind domain_finetune (--task segment:
                          segment_finetune); rerun it with `detrforge run`
    finetune.yaml         the resolved recipe (planned schedule, sizes, architecture)
    plan.json             the plan's values and why each was chosen
    data_check_*.md       the doctor's reports
    inputs/init-<key>/    the pretrained export with its class head mapped to the new classes
    inputs/panoptic-<key>/  --task segment: the val masks as panoptic ground truth (PQ, mIoU)
    finetune/             the stage's run folder; the model is registered as `<name>.finetune`
    per_class_ap.json     detect: the evaluation's per-class AP table
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from launch.errors import CliError
from launch.workdir import add_workdir

STAGE = "finetune"  # the registered model is "<name>.finetune"
PIPELINE_FILE, RECIPE_FILE, PLAN_FILE, EVAL_FILE = ("pipeline.yaml", "finetune.yaml", "plan.json",
                                                     "per_class_ap.json")


def register(sub) -> None:
    """Add the ``finetune`` verb to the CLI's subparsers."""
    ft = sub.add_parser("finetune", help="fine-tune a detector on your own COCO data set "
                        "(check, convert, plan, train, evaluate, register)")
    for split in ("train", "val"):
        ft.add_argument(f"--{split}-annotations", required=True, metavar=f"{split.upper()}.json",
                        help=f"COCO instances json of the {split} split")
        ft.add_argument(f"--{split}-images", required=True, metavar="DIR",
                        help=f"folder the {split} json's file_name entries are relative to")
    ft.add_argument("--from", dest="source", metavar="MODEL",
                    help="pretrained detector: models:/<name>@<alias>, an export or run folder "
                         "(default: the newest registered detector of the workdir)")
    ft.add_argument("--task", choices=("detect", "segment"), default="detect",
                    help="segment: train a mask head too (the jsons need instance masks)")
    budget = ft.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="training budget in minutes")
    budget.add_argument("--steps", type=int, help="training steps (default: by data-set size)")
    ft.add_argument("--name", help="run name: folder <workdir>/<name>, registered model "
                                   "<name>.finetune (default: the data set's folder name)")
    ft.add_argument("--processes", type=int, default=1, help="ranks on this machine")
    ft.add_argument("--cluster", metavar="C.yaml", help="submit to SLURM with this cluster file "
                                                        "instead of training here")
    ft.add_argument("overrides", nargs="*", help="key=value overrides of the generated recipe")
    add_workdir(ft)
    ft.set_defaults(handler=cmd_finetune)


def default_name(train_annotations: Path) -> str:
    """The data set's folder name (the json's folder, or the one above `annotations/`)."""
    folder = train_annotations.resolve().parent
    if folder.name.lower() in ("annotations", "labels") and folder.parent.name:
        folder = folder.parent
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", folder.name).lstrip("._-")
    return name or "custom"


def _tracking_uri(workdir: Path) -> str:
    from pipeline.tracking import tracking_uri_for

    return tracking_uri_for(workdir)


def _local_meta(workdir: Path, model_name: str) -> dict | None:
    """meta.json of a registered model's stage run folder in this workdir, if it is here."""
    from pipeline.run_folder import RunFolder

    pipeline, _, stage = model_name.rpartition(".")
    meta = RunFolder(workdir / pipeline / stage).export_meta_path
    return json.loads(meta.read_text()) if pipeline and meta.is_file() else None


def newest_detector(workdir: Path, exclude_prefix: str) -> str | None:
    """`models:/<name>/<version>` of the newest registered detector of the workdir, leaving out
    the models of ``exclude_prefix`` (this fine-tune's own, so a rerun starts from the same
    model); None when there is none."""
    from pipeline.registry import list_models

    if not (workdir / "mlflow.db").is_file() and _tracking_uri(workdir).startswith("sqlite"):
        return None
    newest: dict[str, object] = {}
    for row in list_models(_tracking_uri(workdir)):
        if not row.name.startswith(exclude_prefix):
            newest[row.name] = row  # rows come sorted by version: the last is the newest
    for row in sorted(newest.values(), key=lambda r: (r.created_ms, r.name), reverse=True):
        meta = _local_meta(workdir, row.name)
        if meta is None:
            meta = json.loads((_download(workdir, f"models:/{row.name}/{row.version}")
                               / "meta.json").read_text())
        if meta.get("kind") == "detector":
            return f"models:/{row.name}/{row.version}"
    return None


def _download(workdir: Path, uri: str) -> Path:
    from pipeline.inference.model_io import resolve_model
    from pipeline.model_cache import workdir_model_cache

    return resolve_model(uri, _tracking_uri(workdir), workdir_model_cache(workdir))


def resolve_source(args, workdir: Path, name: str) -> tuple[str, Path]:
    """(what --from was, the local export folder of the pretrained detector)."""
    source = args.source or newest_detector(workdir, f"{name}.")
    if source is None:
        raise CliError(f"detrforge finetune: no registered detector in {workdir}; pass --from "
                       "MODEL (an export folder or models:/<name>@<alias>), or run "
                       "`make demo` first")
    return source, _download(workdir, source)


def _splits(args):
    from pipeline.finetune_data import CocoSplit

    return (CocoSplit(Path(args.train_annotations).resolve(), Path(args.train_images).resolve()),
            CocoSplit(Path(args.val_annotations).resolve(), Path(args.val_images).resolve()))


def plan(args, meta: dict, train, workdir: Path):
    """The schedule for this data set, budget and pretrained recipe (pipeline.finetune_plan)."""
    import torch

    from pipeline import finetune_plan as fp
    from pipeline.data.coco_clean import clean_coco, load_coco_json

    stats = fp.dataset_stats(clean_coco(load_coco_json(train.annotations), str(train.annotations)))
    pretrained = fp.PretrainedRecipe.from_meta(meta)
    step_time = None
    if args.minutes is not None:
        logs = workdir / str(meta.get("pipeline")) / str(meta.get("stage")) / "logs" / "metrics.jsonl"
        step_time = (fp.measured_step_time(logs, pretrained.batch_size, pretrained.eval_size)
                     or fp.estimated_step_time("cuda" if torch.cuda.is_available() else "cpu"))
    return stats, fp.plan_schedule(stats, fp.Budget(args.steps, args.minutes), pretrained,
                                   step_time)


def check_data(train, val, eval_size: int, max_size: int, folder: Path) -> None:
    """The doctor on both splits (train against val's classes) at the planned input size;
    errors stop with its lines."""
    from pipeline.data.doctor import DoctorConfig, check_coco

    cfg = DoctorConfig(input_size=eval_size, max_size=max(max_size, eval_size))
    reports = [check_coco(train.annotations, train.images, cfg, val.annotations),
               check_coco(val.annotations, val.images, cfg)]
    for split, report in zip(("train", "val"), reports):
        print(report.format(), end="")
        report.write(folder / f"data_check_{split}.md")
    errors = sum(len(r.errors()) for r in reports)
    if errors:
        raise CliError(f"detrforge finetune: the data check found {errors} error(s) (listed "
                       f"above, also in {folder}/data_check_*.md); fix them and run again")


def write_files(folder: Path, recipe: dict, overrides: list[str], schedule, extra: dict) -> Path:
    """finetune.yaml, pipeline.yaml (overrides kept in it) and plan.json; the pipeline path."""
    from pipeline.config import absolutize_overrides
    from stages import stage_module

    schema = stage_module(recipe["stage"]).Config
    header = "# Written by `detrforge finetune`; edit it and rerun with `detrforge run`.\n"
    (folder / RECIPE_FILE).write_text(header + yaml.safe_dump(recipe, sort_keys=False))
    stage = {"name": STAGE, "recipe": RECIPE_FILE}
    if overrides:  # given on the command line: relative paths are the current folder's
        stage["overrides"] = absolutize_overrides(list(overrides), schema, Path.cwd())
    pipeline = {"name": folder.name, "stages": [stage]}
    (folder / PIPELINE_FILE).write_text(header + yaml.safe_dump(pipeline, sort_keys=False))
    (folder / PLAN_FILE).write_text(json.dumps({**schedule.to_dict(), **extra}, indent=1))
    return folder / PIPELINE_FILE


def check_masks(train, val) -> None:
    """--task segment: every annotation of both splits has a mask (one line naming the file)."""
    from pipeline.data.coco_clean import load_coco_json
    from pipeline.finetune_masks import check_masks as check

    for split in (train, val):
        check(split.annotations, load_coco_json(split.annotations).get("annotations") or [])


def segment_inputs(shards: Path, folder: Path) -> Path:
    """The panoptic view of the val split's masks (cached by the cleaned file's content)."""
    from pipeline.data.shards import load_shard_info
    from pipeline.finetune_masks import panoptic_key, write_things_panoptic

    instances = load_shard_info(shards / "val").annotation_path
    return write_things_panoptic(instances, folder / "inputs" / f"panoptic-{panoptic_key(instances)}")


def prepare(args, workdir: Path, name: str) -> Path:
    """Doctor, plan, convert, map classes, write the files; returns the pipeline file."""
    from pipeline.data.shards import load_shard_info
    from pipeline.finetune_classes import mapped_export_key, write_mapped_export
    from pipeline.finetune_data import convert_splits
    from pipeline.finetune_plan import PlanError
    from pipeline.finetune_recipe import build_recipe, build_segment_recipe, segmenter_section
    from pipeline.inference.model_io import read_meta

    train, val = _splits(args)
    if args.task == "segment":
        check_masks(train, val)
    source, export = resolve_source(args, workdir, name)
    meta = read_meta(export)
    if args.task == "segment":  # a detector that cannot carry a mask head stops before any work
        segmenter_section(meta.get("detector") or {}, source)
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    try:
        stats, schedule = plan(args, meta, train, workdir)
    except PlanError:  # e.g. no usable image: the doctor says why, at the default size
        check_data(train, val, 800, 1333, folder)
        raise
    check_data(train, val, schedule.eval_size, schedule.max_size, folder)
    shards, converted, _ = convert_splits(workdir, train, val)
    print(f"shards: {shards} ({'converted now' if converted else 'cached, nothing converted'})")
    categories = load_shard_info(shards / "train").categories
    init = folder / "inputs" / f"init-{mapped_export_key(meta, categories, 0)}"
    init, mapping = write_mapped_export(export, categories, init)
    print(f"from {source}: {mapping.describe()}")
    print("plan:\n  " + "\n  ".join(schedule.reasons))
    if args.task == "segment":
        recipe = build_segment_recipe(meta, schedule, shards, init, folder, stats.images,
                                      segment_inputs(shards, folder), source, args.processes)
    else:
        recipe = build_recipe(meta, schedule, shards, init, folder, stats.images, args.processes)
    return write_files(folder, recipe, args.overrides, schedule,
                       {"from": source, "class_mapping": mapping.kept, "shards": str(shards)})


def per_class_report(run_dir: Path, folder: Path) -> dict:
    """The per-class AP table of the stage's export on the val split (cached by its weights)."""
    from pipeline.inference.evaluate import evaluate_batches
    from pipeline.inference.model_io import read_meta
    from pipeline.inference.predictor import Predictor
    from pipeline.run_folder import RunFolder

    export = RunFolder(run_dir).export_dir
    sha = read_meta(export).get("weights_sha256")
    cached = folder / EVAL_FILE
    if cached.is_file() and json.loads(cached.read_text()).get("weights_sha256") == sha:
        return json.loads(cached.read_text())
    predictor = Predictor.from_export(export)
    report = evaluate_batches(predictor, *_val_loader(predictor))
    report["weights_sha256"] = sha
    cached.write_text(json.dumps(report, indent=1))
    return report


def _val_loader(predictor):
    """(the stage's evaluation loader over its val split, that split's annotation file)."""
    import dataclasses

    from pipeline.data.detection import DetectionDataConfig, build_detection_loader
    from pipeline.data.shards import load_shard_info

    data = dict((predictor.meta.get("config") or {}).get("data") or {})
    names = {f.name for f in dataclasses.fields(DetectionDataConfig)}
    cfg = DetectionDataConfig(**{k: v for k, v in data.items() if k in names})
    annotations = load_shard_info(Path(cfg.shards) / "val").annotation_path
    return build_detection_loader(cfg, "val", 0, 1), annotations


# The stage's segmentation metrics worth a line each (DONE.json has them all).
SEGMENT_METRICS = ("segm_AP", "segm_AP50", "segm_AP75", "bbox_AP", "PQ", "SQ", "RQ", "mIoU")


def report_run(pipeline_file: Path, workdir: Path, task: str) -> None:
    """detect: per-class AP; segment: the stage's mask AP, PQ and mIoU. Then where the pictures,
    the MLflow run and the registered model are."""
    from pipeline.inference.evaluate import format_report
    from stages.common import read_done

    folder = pipeline_file.parent
    run_dir = folder / STAGE
    if task == "segment":
        metrics = (read_done(run_dir) or {}).get("metrics") or {}
        print(format_report({"metrics": {k: metrics[k] for k in SEGMENT_METRICS if k in metrics}}))
        print(f"pictures:   {run_dir / 'artifacts' / 'segmentation'}")
    else:
        print(format_report(per_class_report(run_dir, folder)))
        print(f"pictures:   {run_dir / 'artifacts' / 'predictions'}")
    print_model(pipeline_file, workdir)


def print_model(pipeline_file: Path, workdir: Path) -> None:
    """The stage's MLflow run and registered model, and how to rerun it."""
    from stages.common import read_done

    done = read_done(pipeline_file.parent / STAGE) or {}
    print(f"MLflow run: {done.get('mlflow_run_id')}  (detrforge ui --workdir {workdir})")
    version = done.get("model_version")
    model = f"models:/{done.get('registered_model')}/{version}" if version else "not registered"
    print(f"model:      {model}   rerun: detrforge run {pipeline_file} --workdir {workdir}")


def _stage_up_to_date(pipeline_file: Path, workdir: Path) -> bool:
    from launch.graph import is_up_to_date, load_target

    pipeline = load_target(pipeline_file, [])
    return is_up_to_date(pipeline, pipeline.stage(STAGE), workdir)


def cmd_finetune(args) -> int:
    from launch.graph import check_name
    from launch.runner import run_target, submit_pipeline

    if args.processes < 1:
        raise CliError(f"--processes must be >= 1, got {args.processes}")
    workdir = Path(args.workdir).resolve()
    name = check_name(args.name or default_name(Path(args.train_annotations)), "--name",
                      "detrforge finetune")
    pipeline_file = prepare(args, workdir, name)
    print(f"recipe: {pipeline_file.parent / RECIPE_FILE}")
    up_to_date = _stage_up_to_date(pipeline_file, workdir)
    if up_to_date:
        print(f"stage {name}/{STAGE} is up to date: nothing to train")
    if args.cluster:
        code = submit_pipeline(pipeline_file, Path(args.cluster), workdir)
        if up_to_date:
            print_model(pipeline_file, workdir)
        else:
            print(f"then: detrforge status {pipeline_file} --workdir {workdir}")
        return code
    code = run_target(pipeline_file, [], workdir)
    if code == 0:
        report_run(pipeline_file, workdir, args.task)
    return code
