"""A consolidated fp32 export from any complete checkpoint of a run folder, in one process.

Single-process checkpoints hold the whole model; DeepSpeed ones (ZeRO 0-3) are merged by
DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint``, which reads every rank's shards,
so a stage that was interrupted (or lost its export) can still hand its weights on.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.checkpoint import COMPLETE_MARKER
from pipeline.engine.strategy import SINGLE_STATE_FILE
from pipeline.export import write_export
from pipeline.inference.model_io import InferenceError
from pipeline.run_folder import RunFolder


def checkpoint_dir(run_folder: str | Path, step: int | None = None) -> Path:
    """checkpoints/step_<N> (complete) of ``step``, or the one `latest` names."""
    run_folder = Path(run_folder)
    if step is None:
        latest = RunFolder(run_folder).latest_path
        if not latest.is_file():
            raise InferenceError(f"{run_folder}: no `latest` checkpoint; pass --step N of a "
                                 "complete checkpoints/step_<N> folder")
        directory = run_folder / "checkpoints" / latest.read_text().strip()
    else:
        directory = run_folder / "checkpoints" / f"step_{step}"
    if not (directory / COMPLETE_MARKER).exists():
        have = sorted(p.name for p in (run_folder / "checkpoints").glob("step_*")
                      if (p / COMPLETE_MARKER).exists())
        raise InferenceError(f"{directory}: not a complete checkpoint; complete ones: "
                             f"{', '.join(have) or 'none'}")
    return directory


def consolidated_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """fp32 model weights (and buffers) of one checkpoint folder, on the CPU."""
    single = directory / SINGLE_STATE_FILE
    if single.is_file():
        state = torch.load(single, map_location="cpu", weights_only=True)["model"]
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(directory.parent), tag=directory.name)
        except (FileNotFoundError, ValueError) as err:
            raise InferenceError(f"{directory}: not a readable DeepSpeed checkpoint ({err})") from None
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def export_checkpoint(run_folder: str | Path, out_dir: str | Path, meta: dict,
                      step: int | None = None) -> Path:
    """Write out_dir/model.safetensors + meta.json from a checkpoint; returns out_dir."""
    directory = checkpoint_dir(run_folder, step)
    state = consolidated_state_dict(directory)
    write_export(out_dir, state, {**meta, "checkpoint": directory.name})
    return Path(out_dir)
