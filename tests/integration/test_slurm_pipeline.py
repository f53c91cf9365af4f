"""`detrforge submit / status / cancel` on the real local SLURM cluster, through the real CLI.

Start the cluster with `launch/slurm/cluster.sh up`. Skipped, with the reason, only when `sinfo`
cannot reach a cluster (found through SLURM_CONF, else cluster.sh's default state folder).

One module fixture submits two pipelines at once, so their jobs overlap: "tinypipe" (backbone on
2 DeepSpeed ranks -> detr) runs untouched; "requeued" is the same backbone stage alone, which
`scontrol requeue` interrupts once it has saved a checkpoint. The untouched backbone is the
reference that the resumed one, and the same stage run by `detrforge run` here, must match.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STAGES = REPO / "configs" / "stages"
CLUSTER_FILE = REPO / "configs" / "clusters" / "local.yaml"
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

FAST = ["train.progress_bar=false", "train.log_every=1"]
BACKBONE = ["model.name=resnet10t", "data.image_size=32", "data.batch_size=8",
            "data.num_workers=0", "data.shuffle_buffer=16", "strategy.kind=deepspeed",
            "strategy.zero_stage=2", "train.max_steps=40", "train.checkpoint_every=5", *FAST]
DETR = ["model.num_queries=10", "model.hidden_dim=32", "model.enc_layers=1", "model.dec_layers=1",
        "model.dim_feedforward=64", "model.backbone.name=resnet10t", "data.train_scales=[64]",
        "data.eval_size=64", "data.max_size=96", "data.batch_size=2", "data.num_workers=0",
        "data.shuffle_buffer=16", "eval.pictures=1", "train.max_steps=3",
        "train.checkpoint_every=2", *FAST]
# Without MLflow `submit` takes seconds less (no parent run); the first pipelines test it.
NO_TRACKING = ("tracking.enabled=false",)
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE")


def _default_slurm_conf() -> Path:
    home = os.environ.get("DETRFORGE_SLURM_HOME") or REPO / ".cache" / "slurm"
    return Path(home) / "etc" / "slurm.conf"


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    """The environment of `detrforge` commands: SLURM_CONF of the running local cluster."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if "SLURM_CONF" not in env and _default_slurm_conf().exists():
        env["SLURM_CONF"] = str(_default_slurm_conf())
    if shutil.which("sinfo") is None:
        pytest.skip("local SLURM cluster is not up: no `sinfo` (run launch/slurm/cluster.sh up)")
    conf = env.get("SLURM_CONF")
    if conf and not Path(conf).exists():  # sinfo would retry for a minute
        pytest.skip(f"local SLURM cluster is not up: SLURM_CONF={conf} does not exist "
                    "(run launch/slurm/cluster.sh up)")
    try:
        probe = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env,
                               capture_output=True, text=True, timeout=15)
        failure = probe.stderr.strip() if probe.returncode else ""
    except subprocess.TimeoutExpired:
        failure = "no answer within 15 s"
    if failure:
        pytest.skip(f"local SLURM cluster is not up: sinfo failed ({failure}); "
                    "run launch/slurm/cluster.sh up")
    return env


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    from pipeline.data.samples import make_samples

    out = tmp_path_factory.mktemp("samples")
    make_samples(out, size="tiny", seed=0)
    return out


def stage(name: str, recipe: str, overrides: list[str], processes: int | None = None) -> dict:
    entry = {"name": name, "recipe": str(STAGES / recipe), "overrides": overrides}
    if processes:
        entry["processes"] = processes
    return entry


def backbone_stage(samples: Path, extra: tuple[str, ...] = ()) -> dict:
    return stage("backbone", "backbone_pretrain/tiny.yaml",
                 [f"data.shards={samples}/classify", *BACKBONE, *extra], processes=2)


def detr_stage(samples: Path, extra: tuple[str, ...] = ()) -> dict:
    return stage("detr", "detr_pretrain/tiny.yaml",
                 [f"data.shards={samples}/detect", "backbone_init=stage:backbone", *DETR, *extra])


def write_pipeline(path: Path, name: str, stages: list[dict]) -> Path:
    path.write_text(json.dumps({"name": name, "stages": stages}))  # JSON is YAML
    return path


def detrforge(env: dict, *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "detrforge"
    done = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, f"detrforge {args[0]}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


def submit(env: dict, pipeline_file: Path, workdir: Path) -> dict[str, str]:
    """stage -> job id of `detrforge submit` (which warns only when jobs track into SQLite)."""
    done = detrforge(env, "submit", str(pipeline_file), "--cluster", str(CLUSTER_FILE),
                     "--workdir", str(workdir))
    tracked = "tracking.enabled=false" not in pipeline_file.read_text()
    sqlite = tracked and not env.get("MLFLOW_TRACKING_URI")
    assert ("SQLite store" in done.stderr) == sqlite, done.stderr
    name = json.loads(pipeline_file.read_text())["name"]
    jobs = json.loads((workdir / name / "jobs.json").read_text())
    return {stage_name: job["job_id"] for stage_name, job in jobs.items()}


def sacct_states(env: dict, job_ids: list[str]) -> dict[str, str]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
                         env=env, capture_output=True, text=True, timeout=30).stdout
    return {line.split("|")[0]: line.split("|")[1].split()[0]
            for line in out.splitlines() if "|" in line}


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.25) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(poll_s)


def wait_final(env: dict, jobs: dict[str, str], timeout_s: float) -> dict[str, str]:
    """stage -> final SLURM state, once every job has one."""
    states: dict[str, str] = {}

    def all_final() -> bool:
        states.update(sacct_states(env, list(jobs.values())))
        return all(states.get(job_id) in FINAL_STATES for job_id in jobs.values())

    wait_for(all_final, timeout_s, f"jobs {jobs} to end (last states {states})", poll_s=1.0)
    return {stage_name: states[job_id] for stage_name, job_id in jobs.items()}


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, train/loss) of every logged step, in the order logged (a resumed run repeats some)."""
    rows = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["metrics"]["train/loss"]) for row in rows
            if "train/loss" in row["metrics"]]


@pytest.fixture(scope="module")
def submitted(slurm_env, samples, cluster_mlflow_server, tmp_path_factory) -> dict:
    """Both pipelines submitted together, "requeued" requeued once it has a checkpoint, and the
    same backbone stage run meanwhile by `detrforge run` (torchrun, 2 ranks) on this machine.
    They track into an MLflow server whose store is the cluster's MariaDB, as a real cluster
    should (a SQLite file on a shared file system is what `submit` warns about)."""
    root = tmp_path_factory.mktemp("submitted")
    tracked_env = {**slurm_env, "MLFLOW_TRACKING_URI": cluster_mlflow_server.url}
    full = write_pipeline(root / "tinypipe.yaml", "tinypipe",
                          [backbone_stage(samples), detr_stage(samples)])
    alone = write_pipeline(root / "requeued.yaml", "requeued", [backbone_stage(samples)])
    full_jobs = submit(tracked_env, full, root / "full")
    requeued_jobs = submit(tracked_env, alone, root / "alone")
    with open(root / "local.log", "w") as log:
        local = subprocess.Popen([str(Path(sys.executable).parent / "detrforge"), "run",
                                  str(alone), "--workdir", str(root / "local")],
                                 env=tracked_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    run_dir = root / "alone" / "requeued" / "backbone"
    try:
        wait_for(lambda: (run_dir / "latest").exists(), 300, "the first checkpoint to requeue from")
        subprocess.run(["scontrol", "requeue", requeued_jobs["backbone"]], env=slurm_env,
                       check=True, timeout=30)
        states = wait_final(slurm_env, {**full_jobs, "requeued": requeued_jobs["backbone"]}, 600)
        local_code = local.wait(timeout=600)
    finally:
        local.kill()  # no-op once it has ended
    return {"full": (full, root / "full", full_jobs), "requeued": run_dir, "states": states,
            "local": (local_code, root / "local.log", root / "local" / "requeued" / "backbone")}


def assert_same_run(run_dir: Path, reference_dir: Path) -> None:
    """Same train loss at every logged step, same final metrics and exported weights."""
    reference = dict(train_losses(reference_dir))
    for step, loss in train_losses(run_dir):
        assert loss == pytest.approx(reference[step], rel=1e-6, abs=1e-7), f"train/loss, step {step}"
    done = json.loads((run_dir / "DONE.json").read_text())
    reference_done = json.loads((reference_dir / "DONE.json").read_text())
    assert done["metrics"] == pytest.approx(reference_done["metrics"], rel=1e-6, abs=1e-9)

    from safetensors.torch import load_file

    weights = load_file(run_dir / "export" / "model.safetensors")
    reference_weights = load_file(reference_dir / "export" / "model.safetensors")
    assert weights.keys() == reference_weights.keys()
    for name, tensor in weights.items():
        assert (tensor.double() - reference_weights[name].double()).abs().max() <= 1e-6, name


def test_submitted_pipeline_runs_every_stage_with_two_ranks_for_one(slurm_env, submitted):
    pipeline_file, workdir, jobs = submitted["full"]
    assert {name: submitted["states"][name] for name in jobs} == {"backbone": "COMPLETED",
                                                                  "detr": "COMPLETED"}
    for name in jobs:
        done = json.loads((workdir / "tinypipe" / name / "DONE.json").read_text())
        assert done["stage"] == name and done["model_version"] == 1
    backbone_config = (workdir / "tinypipe" / "backbone" / "config.yaml").read_text()
    assert "world_size: 2" in backbone_config  # one SLURM job, two DeepSpeed ranks
    status = detrforge(slurm_env, "status", str(pipeline_file), "--workdir", str(workdir)).stdout
    for name, job_id in jobs.items():
        line = next(line for line in status.splitlines() if line.strip().startswith(name))
        assert " done " in line and f"job {job_id} COMPLETED" in line, status


def test_requeued_stage_resumes_and_ends_like_an_uninterrupted_run(submitted):
    assert submitted["states"]["requeued"] == "COMPLETED"
    run_dir = submitted["requeued"]
    assert json.loads((run_dir / "result.json").read_text())["start"] == "resume"
    job_log = next((run_dir.parent / ".submitit").glob("*/*_0_log.out")).read_text()
    resumed = re.search(r"resumed exactly from \S+/step_(\d+)", job_log)
    assert resumed and 0 < int(resumed[1]) < 40, job_log  # requeued in the middle of training
    assert_same_run(run_dir, submitted["full"][1] / "tinypipe" / "backbone")


def test_local_run_of_the_stage_equals_the_slurm_run(submitted):
    code, log, run_dir = submitted["local"]
    assert code == 0, log.read_text()[-3000:]
    assert_same_run(run_dir, submitted["full"][1] / "tinypipe" / "backbone")


def test_failing_stage_cancels_its_dependants_and_status_says_why(slurm_env, samples, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    failing = stage("backbone", "backbone_pretrain/tiny.yaml",
                    [f"data.shards={empty}", "model.name=resnet10t", "data.num_workers=0",
                     "train.max_steps=2", *FAST, *NO_TRACKING])
    pipeline_file = write_pipeline(tmp_path / "failing.yaml", "failing",
                                   [failing, detr_stage(samples, NO_TRACKING)])
    jobs = submit(slurm_env, pipeline_file, tmp_path / "work")
    assert wait_final(slurm_env, jobs, 300) == {"backbone": "FAILED", "detr": "CANCELLED"}
    reason = subprocess.run(["squeue", "-h", "-t", "all", "-j", jobs["detr"], "-o", "%r"],
                            env=slurm_env, capture_output=True, text=True).stdout.strip()
    assert reason in ("", "DependencyNeverSatisfied")  # squeue forgets finished jobs after a while
    status = detrforge(slurm_env, "status", str(pipeline_file), "--workdir",
                       str(tmp_path / "work")).stdout
    lines = {line.split()[0]: line for line in status.splitlines()[1:]}
    assert f"job {jobs['backbone']} FAILED" in lines["backbone"]
    assert str(empty) in lines["backbone"], status  # the failed stage's error names the folder
    assert f"job {jobs['detr']} CANCELLED" in lines["detr"]
    assert "DependencyNeverSatisfied" in lines["detr"] and jobs["backbone"] in lines["detr"], status
    assert not (tmp_path / "work" / "failing" / "detr" / "DONE.json").exists()


def test_second_submit_keeps_queued_jobs_and_cancel_cancels_them(slurm_env, samples, tmp_path):
    # A first stage far too long to finish before `cancel`, however slow the CLI calls are.
    endless = (*NO_TRACKING, "train.max_steps=1000000")
    pipeline_file = write_pipeline(tmp_path / "cancelled.yaml", "cancelled",
                                   [backbone_stage(samples, endless),
                                    detr_stage(samples, NO_TRACKING)])
    workdir = tmp_path / "work"
    jobs = submit(slurm_env, pipeline_file, workdir)
    assert submit(slurm_env, pipeline_file, workdir) == jobs  # queued stages are not queued twice
    cancelled = detrforge(slurm_env, "cancel", str(pipeline_file), "--workdir", str(workdir)).stdout
    assert all(job_id in cancelled for job_id in jobs.values()), cancelled
    assert wait_final(slurm_env, jobs, 120) == {"backbone": "CANCELLED", "detr": "CANCELLED"}
    status = detrforge(slurm_env, "status", str(pipeline_file), "--workdir", str(workdir)).stdout
    assert all(f"job {job_id} CANCELLED" in status for job_id in jobs.values()), status
    assert "did not succeed" not in status  # cancelled by hand, not by a failed dependency
    again = detrforge(slurm_env, "cancel", str(pipeline_file), "--workdir", str(workdir)).stdout
    assert "nothing queued or running" in again


def test_stages_are_tracked_in_the_database_backed_server(submitted, cluster_mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient(cluster_mlflow_server.url)
    _, workdir, jobs = submitted["full"]
    for name in jobs:
        done = json.loads((workdir / "tinypipe" / name / "DONE.json").read_text())
        run = client.get_run(done["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.metrics, name
        steps = {m.step for m in client.get_metric_history(done["mlflow_run_id"], "train/loss")}
        assert steps, name
    versions = client.search_model_versions("name='tinypipe.backbone'")
    assert [v.version for v in versions] == ["1"]
