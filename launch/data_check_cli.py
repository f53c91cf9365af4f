"""`detrforge data check | yolo-to-coco | voc-to-coco`: the data-set doctor and other formats.

Registered under ``detrforge data`` by ``launch.data_cli``. The doctor prints its findings and
exits 2 when there are errors (or warnings, with ``--strict``); conversions from YOLO or VOC write
a COCO json and then run the same doctor on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_FAILED = 2


def _add_doctor_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-size", type=int, default=800, metavar="PX",
                        help="planned shorter image side after resizing (default 800; YOLO-style "
                             "recipes use 640): objects that shrink below a few pixels are "
                             "reported")  # fmt: skip
    parser.add_argument("--strict", action="store_true",
                        help="warnings count as errors (exit 2)")  # fmt: skip
    parser.add_argument("--report", metavar="PATH",
                        help="also write the report: JSON for a .json path, else markdown")


def register_checks(sub) -> None:
    """Add ``check``, ``yolo-to-coco`` and ``voc-to-coco`` to the ``data`` sub-parsers."""
    check = sub.add_parser(
        "check", help="the data-set doctor: what is wrong with a COCO data set, before training",
        description="Check a COCO instances file and its images: ids, categories, files on disk, "
        "image sizes, boxes, object sizes, class balance, train/val classes. Each finding comes "
        "with a count, examples and what the converter does about it.",
    )
    check.add_argument("annotations", metavar="A.json", help="COCO instances json")
    check.add_argument("--images", required=True, metavar="DIR",
                       help="folder the file_name entries are relative to")  # fmt: skip
    check.add_argument("--val", metavar="B.json",
                       help="a validation json whose categories must match")  # fmt: skip
    _add_doctor_options(check)
    check.set_defaults(handler=_cmd_check)

    yolo = sub.add_parser(
        "yolo-to-coco", help="YOLO txt labels (images/ + labels/ + classes.txt) -> COCO json",
        description="Convert a YOLO data set (images/[SPLIT]/, labels/[SPLIT]/*.txt with 'class cx "
        "cy w h' normalised, classes.txt or a data yaml's names) to COCO, then check it.",
    )
    yolo.add_argument("src", metavar="YOLO_DIR", help="folder holding images/ and labels/")
    yolo.set_defaults(handler=_cmd_yolo)
    voc = sub.add_parser(
        "voc-to-coco", help="Pascal VOC XML (Annotations/ + JPEGImages/) -> COCO json",
        description="Convert a Pascal VOC data set to COCO (difficult objects become iscrowd=1, "
        "ignored in training and evaluation), then check it.",
    )
    voc.add_argument("src", metavar="VOC_DIR", help="folder holding Annotations/ and JPEGImages/")
    voc.add_argument("--classes", metavar="FILE",
                     help="class names, one per line, in label order (default: sorted names found)")
    voc.set_defaults(handler=_cmd_voc)
    for parser in (yolo, voc):
        parser.add_argument("--out", required=True, metavar="COCO.json", help="the json to write")
        parser.add_argument("--split", help="convert only this split (YOLO: images/SPLIT; VOC: "
                                            "ImageSets/Main/SPLIT.txt)")  # fmt: skip
        _add_doctor_options(parser)


def _doctor_config(args):
    from pipeline.data.doctor import DoctorConfig

    return DoctorConfig(input_size=args.input_size, max_size=max(1333, args.input_size))


def _finish(report, args) -> int:
    """Print the report (and write it with --report) -> exit code."""
    print(report.format(args.strict), end="")
    if args.report:
        print(f"report written to {report.write(args.report, args.strict)}")
    return EXIT_FAILED if report.errors(args.strict) else 0


def _cmd_check(args) -> int:
    from pipeline.data.doctor import check_coco

    report = check_coco(args.annotations, args.images, _doctor_config(args), args.val)
    return _finish(report, args)


def _write_and_check(imported, args) -> int:
    """Write the converted json, list what could not be read, and run the doctor on it."""
    from pipeline.data.doctor import check_coco_dict

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(imported.coco, indent=None, separators=(",", ":")))
    os.replace(tmp, out)
    coco = imported.coco
    print(f"wrote {out}: {len(coco['images'])} images, {len(coco['annotations'])} annotations, "
          f"{len(coco['categories'])} categories (images: {imported.images_dir})")  # fmt: skip
    for item in imported.skipped[:20]:
        print(f"  skipped {item.file}: {item.reason} {item.detail}".rstrip())
    if len(imported.skipped) > 20:
        print(f"  ... and {len(imported.skipped) - 20} more skipped")
    report = check_coco_dict(coco, str(out), imported.images_dir, _doctor_config(args))
    code = _finish(report, args)
    print(f"next: detrforge data coco-to-shards --images {imported.images_dir} "
          f"--annotations {out} OUT", file=sys.stdout)  # fmt: skip
    return code


def _cmd_yolo(args) -> int:
    from pipeline.data.formats import yolo_to_coco

    return _write_and_check(yolo_to_coco(args.src, args.split), args)


def _cmd_voc(args) -> int:
    from pipeline.data.formats import voc_to_coco

    classes = None
    if args.classes:
        lines = Path(args.classes).read_text().splitlines()
        classes = [line.strip() for line in lines if line.strip()]
    return _write_and_check(voc_to_coco(args.src, args.split, classes), args)
