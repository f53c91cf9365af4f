"""The `detrforge` command line: one verb per user intent.

Only this module prints for the user and chooses exit codes; the library raises typed errors and
they are turned into one clear line here (no tracebacks for bad input).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launch.errors import EXIT_USAGE, CliError, is_user_error, one_line
from launch.workdir import add_workdir as _add_workdir
from launch.workdir import default_workdir

__all__ = ["CliError", "build_parser", "default_workdir", "main"]


# Commands whose ``overrides`` positional takes ``key=value`` tokens; argparse stops filling a
# positional at the first option, so tokens after ``--workdir DIR`` are collected in main().
OVERRIDES_HELP = "dotted key=value overrides, anywhere on the line"


def _add_pipeline_commands(sub) -> None:
    run = sub.add_parser("run", help="run a pipeline (or one recipe) on this machine; resumes "
                                     "by default and skips finished stages")
    run.add_argument("target", help="configs/pipelines/*.yaml or a stage recipe")
    run.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    _add_workdir(run)
    run.add_argument("--force", action="store_true", help="rerun stages that are up to date")
    run.add_argument("--only", metavar="STAGE", help="run this stage only")
    run.add_argument("--from", dest="from_stage", metavar="STAGE",
                     help="start at this stage (earlier ones must be done)")
    run.set_defaults(handler=_cmd_run)

    demo = sub.add_parser("demo", help="make the sample data if missing and run the demo pipeline")
    _add_workdir(demo)
    demo.set_defaults(handler=_cmd_demo)

    submit = sub.add_parser("submit", help="submit a pipeline's stages to SLURM through submitit")
    submit.add_argument("target", help="configs/pipelines/*.yaml")
    submit.add_argument("--cluster", required=True, help="configs/clusters/*.yaml")
    _add_workdir(submit)
    submit.set_defaults(handler=_cmd_submit)

    sweep = sub.add_parser("sweep", help="run one stage over a grid of overrides (here, or as "
                                         "a SLURM job array); table, plot, --promote-best")
    sweep.add_argument("target", help="configs/pipelines/*.yaml or a stage recipe")
    sweep.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    sweep.add_argument("--stage", required=True, help="the pipeline stage to sweep")
    sweep.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                       help="a swept key and its values (repeat for a product grid)")
    sweep.add_argument("--seeds", help="comma-separated seeds: every point once per seed")
    sweep.add_argument("--cluster", help="configs/clusters/*.yaml: run the points as a job array")
    sweep.add_argument("--max-parallel", type=int, help="array tasks running at once")
    sweep.add_argument("--promote-best", metavar="ALIAS", help="alias for the best point's model")
    _add_workdir(sweep)
    sweep.set_defaults(handler=_cmd_sweep)

    for verb, text in (("status", "show where each stage of a pipeline stands"),
                       ("cancel", "cancel a pipeline's queued or running SLURM jobs")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("target", help="configs/pipelines/*.yaml")
        _add_workdir(p)
        p.set_defaults(handler=_cmd_status if verb == "status" else _cmd_cancel)


def _add_model_commands(sub) -> None:
    from launch import finetune_cli, inspect_cli, model_cli

    model_cli.register(sub)  # predict, eval, export
    finetune_cli.register(sub)  # finetune
    inspect_cli.register(sub)  # inspect

    reg = sub.add_parser("registry", help="the MLflow model registry of the workdir")
    reg_sub = reg.add_subparsers(dest="registry_cmd", metavar="{list,promote,register}",
                                 required=True)
    ls = reg_sub.add_parser("list", help="registered models, versions and aliases")
    _add_workdir(ls)
    ls.set_defaults(handler=_cmd_registry_list)
    pr = reg_sub.add_parser("promote", help="point ALIAS of model NAME at VERSION")
    pr.add_argument("name")
    pr.add_argument("version")
    pr.add_argument("alias")
    _add_workdir(pr)
    pr.set_defaults(handler=_cmd_registry_promote)
    rg = reg_sub.add_parser("register", help="register a finished stage whose registration "
                                             "failed (DONE.json with model_version null)")
    rg.add_argument("run_folder", help="<workdir>/<pipeline>/<stage> (the store is the "
                                       "workdir's, or $MLFLOW_TRACKING_URI)")
    rg.set_defaults(handler=_cmd_registry_register)

    ui = sub.add_parser("ui", help="start the MLflow UI on the workdir's store")
    _add_workdir(ui)
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(handler=_cmd_ui)


def _add_config_commands(sub) -> None:
    cfg = sub.add_parser("config", help="inspect recipes")
    cfg_sub = cfg.add_subparsers(dest="config_cmd", metavar="{show}", required=True)
    show = cfg_sub.add_parser("show", help="print the resolved, validated config of a recipe")
    show.add_argument("recipe", help="a stage recipe under configs/stages/")
    show.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    show.set_defaults(handler=_cmd_config_show)


def _add_data_commands(sub) -> None:
    from launch import data_cli

    data_cli.register(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detrforge",
        description="Staged pretraining of DETR-family detectors: backbone -> multi-scale "
                    "Deformable-DETR -> segmentation / domain fine-tuning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_pipeline_commands(sub)
    _add_data_commands(sub)
    _add_model_commands(sub)
    _add_config_commands(sub)
    return parser


def _cmd_config_show(args) -> int:
    from pipeline.config import config_hash, dump_yaml
    from stages import load_stage_config

    stage, cfg = load_stage_config(args.recipe, args.overrides)
    print(f"# stage: {stage}\n# config_hash: {config_hash(cfg)}")
    print(dump_yaml(cfg), end="")
    return 0


def _cmd_run(args) -> int:
    from launch.runner import run_target

    return run_target(args.target, args.overrides, Path(args.workdir), force=args.force,
                      only=args.only, from_stage=args.from_stage)


def _cmd_demo(args) -> int:
    from launch.runner import run_demo

    return run_demo(Path(args.workdir))


def _cmd_submit(args) -> int:
    from launch.runner import submit_pipeline

    return submit_pipeline(args.target, Path(args.cluster), Path(args.workdir))


def _cmd_status(args) -> int:
    from launch.runner import show_status

    return show_status(args.target, Path(args.workdir))


def _cmd_cancel(args) -> int:
    from launch.runner import cancel_pipeline

    return cancel_pipeline(args.target, Path(args.workdir))


def _registry_uri(workdir: Path) -> str | None:
    """The workdir's tracking URI; None when it is the embedded store and that was never made
    (opening it would create an empty database in a folder that may be a typo)."""
    from pipeline.tracking import embedded_tracking_uri, tracking_uri_for

    uri = tracking_uri_for(workdir)
    if uri == embedded_tracking_uri(workdir) and not (workdir / "mlflow.db").is_file():
        return None
    return uri


def _cmd_registry_list(args) -> int:
    from pipeline.registry import list_models

    uri = _registry_uri(Path(args.workdir))
    rows = list_models(uri) if uri else []
    if not rows:
        print(f"no registered models in {uri or Path(args.workdir) / 'mlflow.db'}")
        return 0
    width = max(len("name"), *(len(row.name) for row in rows))
    print(f"{'name':{width}s} {'version':>7s}  aliases")
    for row in rows:
        print(f"{row.name:{width}s} {row.version:>7d}  {', '.join(row.aliases)}")
    return 0


def _cmd_sweep(args) -> int:
    from launch.sweep import run_sweep

    return run_sweep(args.target, args.stage, args.grid, Path(args.workdir), args.overrides,
                     args.seeds, Path(args.cluster) if args.cluster else None,
                     args.max_parallel, args.promote_best)


def _cmd_registry_promote(args) -> int:
    from pipeline.registry import promote

    if not args.version.isdigit():
        raise CliError(f"VERSION must be a version number (see `detrforge registry list`), "
                       f"got {args.version!r}")
    uri = _registry_uri(Path(args.workdir))
    if uri is None:
        raise CliError(f"no MLflow store in {args.workdir} (no mlflow.db): run a pipeline there "
                       "first, or pass the --workdir that holds it")
    promote(uri, args.name, int(args.version), args.alias)
    print(f"{args.name}@{args.alias} -> version {int(args.version)}")
    return 0


def _cmd_registry_register(args) -> int:
    from pipeline.registry import register_run_folder
    from pipeline.tracking import tracking_uri_for

    run_folder = Path(args.run_folder).resolve()
    name, version, now = register_run_folder(run_folder, tracking_uri_for(run_folder.parents[1]))
    print(f"{name} version {version}" + ("" if now else " (already registered)"))
    return 0


def _cmd_ui(args) -> int:
    from pipeline.tracking.viewer import Viewer

    viewer = Viewer(Path(args.workdir), args.host, args.port)
    try:
        seconds = viewer.wait_ready()
        print(f"MLflow UI ready at {viewer.url} after {seconds:.1f} s (Ctrl-C stops it)")
        for name, url in viewer.training_links(args.workdir):
            print(f"  {name}: {url}")
        sys.stdout.flush()
        return viewer.process.wait()
    finally:
        viewer.stop()


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, taking ``key=value`` tokens anywhere on the line as overrides of the commands that
    have them (``run RECIPE --workdir DIR a.b=1``); any other leftover token is a usage error."""
    args, extra = parser.parse_known_args(argv)
    overrides = [t for t in extra if "=" in t and not t.startswith("-")]
    rest = [t for t in extra if t not in overrides]
    if overrides and not hasattr(args, "overrides"):
        rest = extra  # this command takes no overrides
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        return int(args.handler(args) or 0)
    except Exception as err:
        if not (is_user_error(err) or isinstance(err, CliError)):
            raise
        print(f"detrforge: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("detrforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
