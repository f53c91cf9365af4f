"""The ``--workdir`` option every command shares: where runs, checkpoints and the MLflow store
live (one module, so that each command module imports it without importing the CLI)."""

from __future__ import annotations

import argparse
import os


def default_workdir() -> str:
    return os.environ.get("DETRFORGE_WORKDIR", "runs")


def add_workdir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default=default_workdir(),
                        help="where runs, checkpoints and the MLflow store live "
                             "(default: $DETRFORGE_WORKDIR or ./runs)")
