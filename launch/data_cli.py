"""`detrforge data ...`: make the sample sets and convert data sets to shards.

Wired into the main parser by ``launch.cli`` through :func:`register`. Handlers print the
converters' summaries and return an exit code; data errors become one line on stderr (exit 2).
"""

from __future__ import annotations

import argparse
import os
import sys

from launch.data_check_cli import register_checks
from launch.errors import one_line

EXIT_DATA_ERROR = 2


def _add_conversion_options(parser: argparse.ArgumentParser, shard_size: int) -> None:
    parser.add_argument(
        "--shard-size",
        type=int,
        default=shard_size,
        help=f"images per shard (default {shard_size})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="processes (default: min(4, CPUs))",
    )
    parser.add_argument(
        "--split", help="split name written to _info.json (default: OUT's folder name)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``data`` command and its sub-commands to the CLI's sub-parsers."""
    data = subparsers.add_parser("data", help="make sample data and convert data sets to shards")
    sub = data.add_subparsers(
        dest="data_cmd",
        metavar="{imagefolder-to-shards,coco-to-shards,make-samples,check,yolo-to-coco,"
        "voc-to-coco}",
        required=True,
    )

    folder = sub.add_parser(
        "imagefolder-to-shards",
        help="SRC/<class>/<image> -> classification shards (<key>.jpg + <key>.cls)",
        description="Convert an ImageFolder tree (one sub-folder per class) to tar shards with _info.json.",
    )
    folder.add_argument("src", metavar="SRC", help="folder with one sub-folder per class")
    folder.add_argument(
        "out", metavar="OUT", help="output folder for the shards (e.g. data/imagenet/train)"
    )
    _add_conversion_options(folder, 1000)
    folder.set_defaults(handler=_cmd_imagefolder)

    coco = sub.add_parser(
        "coco-to-shards",
        help="COCO instances json + images -> detection shards (<key>.jpg + <key>.json)",
        description="Convert a COCO detection data set to tar shards; bad images and annotations are "
        "reported and skipped, and a copy of the annotation file is kept beside the shards.",
    )
    coco.add_argument(
        "--images",
        required=True,
        metavar="DIR",
        help="folder the file_name entries are relative to",
    )
    coco.add_argument("--annotations", required=True, metavar="FILE", help="COCO instances json")
    coco.add_argument(
        "out", metavar="OUT", help="output folder for the shards (e.g. data/coco/val)"
    )
    _add_conversion_options(coco, 1000)
    coco.set_defaults(handler=_cmd_coco)

    samples = sub.add_parser(
        "make-samples",
        help="generate the sample sets (classify, detect, domain) as shards + COCO json",
        description="Generate the project's sample data sets deterministically from a seed.",
    )
    samples.add_argument("out", metavar="OUT", help="output folder (e.g. data/samples)")
    samples.add_argument(
        "--size",
        choices=["tiny", "small", "medium"],
        default="small",
        help="tiny: for tests; small: the demo; medium: ~10x",
    )
    samples.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    samples.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="processes"
    )
    samples.set_defaults(handler=_cmd_make_samples)
    register_checks(sub)
    return data


def _report_errors(run):
    """Run a conversion; a DataError becomes one line on stderr and exit code 2."""
    from pipeline.data.errors import DataError

    try:
        return run()
    except DataError as err:
        print(f"detrforge: error: {one_line(err)}", file=sys.stderr)
        return None


def _cmd_imagefolder(args) -> int:
    from pipeline.data.convert import imagefolder_to_shards

    summary = _report_errors(
        lambda: imagefolder_to_shards(
            args.src,
            args.out,
            args.shard_size,
            args.workers,
            split=args.split,
            progress=not args.no_progress,
        )
    )
    if summary is None:
        return EXIT_DATA_ERROR
    print(summary.format())
    return 0


def _cmd_coco(args) -> int:
    from pipeline.data.convert import coco_to_shards

    summary = _report_errors(
        lambda: coco_to_shards(
            args.images,
            args.annotations,
            args.out,
            args.shard_size,
            args.workers,
            split=args.split,
            progress=not args.no_progress,
        )
    )
    if summary is None:
        return EXIT_DATA_ERROR
    print(summary.format())
    return 0


def _cmd_make_samples(args) -> int:
    from pipeline.data.samples import make_samples

    summaries = _report_errors(lambda: make_samples(args.out, args.size, args.seed, args.workers))
    if summaries is None:
        return EXIT_DATA_ERROR
    for name, summary in summaries.items():
        print(
            f"{name}: {summary.images_written} images, {summary.annotations_kept} annotations, "
            f"{summary.shards} shards, skipped {summary.skipped_by_reason() or 0}"
        )
    print(f"sample sets written to {args.out}")
    return 0
