"""A registry error while rank 0 resolves `init_from: models:/...` reaches every rank as the same
one-line error (here: one process; the broadcast carries the outcome, failure included)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from stages.inputs import InputError, resolve_init


def test_unknown_registered_model_is_one_input_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ctx = SimpleNamespace(workdir=tmp_path, pipeline="pipe", stage="detr",
                          run_dir=tmp_path / "pipe" / "detr")
    with pytest.raises(InputError) as error:
        resolve_init("models:/nothing.here@production", ctx)
    message = str(error.value)
    assert message.startswith("init_from='models:/nothing.here@production': ")
    assert "\n" not in message
