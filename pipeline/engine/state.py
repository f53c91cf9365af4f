"""TrainState: the loop's own progress, checkpointed with the model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TrainState:
    """Progress of one training run; everything here survives a resume."""

    step: int = 0  # optimizer steps taken (a dropped non-finite batch does not count)
    epoch: int = 0  # passes over a finite loader; 0 for endless streams
    micro_batches: int = 0  # batches drawn from the loader, dropped ones included
    nonfinite_losses: int = 0  # batches dropped for a non-finite loss, over the whole run
    consecutive_nonfinite: int = 0  # non-finite losses in a row, reset by a finite one
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"tracker_run_id": "..."}

    def state_dict(self) -> dict[str, Any]:
        """Plain-type copy for a checkpoint."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`; unknown keys are an error (a checkpoint of another kind)."""
        known = set(asdict(self))
        unknown = set(state) - known
        if unknown:
            raise ValueError(
                f"engine/state.py: checkpoint TrainState has unknown keys {sorted(unknown)}; "
                "was it written by another version of detrforge?"
            )
        for key, value in state.items():
            setattr(self, key, dict(value) if key == "extra" else value)
