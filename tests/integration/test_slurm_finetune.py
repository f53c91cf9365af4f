"""`detrforge finetune --cluster`: the generated one-stage pipeline submitted to the local SLURM
cluster, through the real CLI; the job trains, exports and registers `<name>.finetune`, and the
same call again queues nothing (the stage is up to date).

Skipped, with the reason, when the local cluster is not up (`launch/slurm/cluster.sh up`).
"""

from __future__ import annotations

import json

import pytest
import test_finetune as finetune
import test_slurm_pipeline as single

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

slurm_env = single.slurm_env


def test_finetune_submitted_to_slurm_then_up_to_date(slurm_env, tmp_path):
    from pipeline.registry import list_models
    from pipeline.tracking import tracking_uri_for

    data = finetune.make_user_data(tmp_path)
    argv = finetune.finetune_argv(data, "--cluster", str(single.CLUSTER_FILE))
    workdir, folder = data["workdir"], data["workdir"] / "shapes"
    first = single.detrforge(slurm_env, *argv)
    assert "SQLite store" in first.stderr  # the job tracks into the workdir's mlflow.db
    job_id = json.loads((folder / "jobs.json").read_text())["finetune"]["job_id"]
    assert f"job {job_id}" in first.stdout and "then: detrforge status" in first.stdout
    assert single.wait_final(slurm_env, {"finetune": job_id}, 600) == {"finetune": "COMPLETED"}

    done = json.loads((folder / "finetune" / "DONE.json").read_text())
    assert done["registered_model"] == "shapes.finetune" and done["model_version"] == 1
    assert [(r.name, r.version) for r in list_models(tracking_uri_for(workdir))] == [
        ("shapes.finetune", 1)]
    meta = json.loads((folder / "finetune" / "export" / "meta.json").read_text())
    assert meta["kind"] == "detector" and meta["class_names"] == finetune.NEW_CLASSES

    second = single.detrforge(slurm_env, *argv).stdout
    assert "stage shapes/finetune is up to date" in second and "up to date, skipped" in second
    assert "model:      models:/shapes.finetune/1" in second
    assert "cached, nothing converted" in second
    assert json.loads((folder / "jobs.json").read_text())["finetune"]["job_id"] == job_id
    status = single.detrforge(slurm_env, "status", str(folder / "pipeline.yaml"), "--workdir",
                              str(workdir)).stdout
    line = next(line for line in status.splitlines() if line.strip().startswith("finetune"))
    assert " done " in line and f"job {job_id} COMPLETED" in line, status
