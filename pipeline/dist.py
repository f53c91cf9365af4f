"""The distributed environment: who am I, how many are we, where is the master.

Read from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or from
SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST: the master is the first
node of the job). Collectives fall back to the single-process answer when no process group is
initialised, so the same code runs under `python script.py` and under torchrun.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist


class DistEnvError(ValueError):
    """The environment variables describe an impossible distributed layout."""


DEFAULT_MASTER_PORT = 29500
# How long a rank waits in a collective (and in the rendezvous) for the others before it fails.
# torch's default is 10 min for gloo but 10 min or 30 min (and for NCCL, without async error
# handling, forever) elsewhere; a rank whose peer died must fail in minutes, not hours. Set
# DETRFORGE_COLLECTIVE_TIMEOUT_S for a run (the SLURM job inherits the submitting shell's value);
# raise it when one rank legitimately works alone for longer (a large consolidated export).
COLLECTIVE_TIMEOUT_ENV = "DETRFORGE_COLLECTIVE_TIMEOUT_S"
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0  # global rank, 0 .. world_size - 1
    world_size: int = 1  # number of processes in the job
    local_rank: int = 0  # rank on this node; picks the GPU
    master_addr: str = "127.0.0.1"  # host of rank 0, used for the rendezvous
    master_port: int = DEFAULT_MASTER_PORT  # TCP port of the rendezvous on master_addr

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise DistEnvError(f"dist.py: world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise DistEnvError(
                f"dist.py: rank {self.rank} is outside 0..{self.world_size - 1}; "
                "check RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS"
            )
        if self.local_rank < 0:
            raise DistEnvError(f"dist.py: local_rank must be >= 0, got {self.local_rank}")

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def _int_var(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise DistEnvError(f"dist.py: {name}={value!r} is not an integer") from None


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list: "gpu[01-03,07],cpu5" -> gpu01 gpu02 gpu03 gpu07 cpu5.

    Zero padding of the range start is kept (SLURM's own rule). Several bracket groups in one
    name ("rack[1-2]-n[01-02]") expand as a product, in SLURM's order.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_host(item))
    if not hosts:
        raise DistEnvError(f"dist.py: empty SLURM node list {nodelist!r}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    items, depth, current = [], 0, ""
    for char in text:
        if char == "," and depth == 0:
            items.append(current)
            current = ""
            continue
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0 or depth > 1:
            raise DistEnvError(f"dist.py: malformed SLURM node list {text!r}")
        current += char
    if depth != 0:
        raise DistEnvError(f"dist.py: unbalanced brackets in SLURM node list {text!r}")
    items.append(current)
    return [item for item in items if item]


def _expand_host(pattern: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    hosts = []
    for number in _expand_ranges(match.group(1), pattern):
        hosts.extend(_expand_host(head + number + tail))
    return hosts


def _expand_ranges(ranges: str, pattern: str) -> list[str]:
    numbers = []
    for part in ranges.split(","):
        found = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if found is None:
            raise DistEnvError(f"dist.py: cannot parse range {part!r} in node list {pattern!r}")
        start, end = found.group(1), found.group(2) or found.group(1)
        if int(end) < int(start):
            raise DistEnvError(f"dist.py: descending range {part!r} in node list {pattern!r}")
        numbers.extend(str(n).zfill(len(start)) for n in range(int(start), int(end) + 1))
    return numbers


def _first_slurm_host(nodelist: str) -> str:
    """The first host of the job, from `scontrol` when available, else parsed here."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass  # a PATH with scontrol but no cluster behind it: parse ourselves
    return expand_nodelist(nodelist)[0]


def node_address(node: str) -> str:
    """An address for SLURM node ``node``: the name itself when it resolves (a real cluster),
    else the node's ``NodeAddr`` from ``scontrol show node`` (several slurmd on one host serve
    node names such as n1, n2 that no resolver here knows: they live at the host's address)."""
    try:
        socket.getaddrinfo(node, None)
        return node
    except (socket.gaierror, UnicodeError):
        pass
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "node", node, "-o"], capture_output=True,
                                 text=True, timeout=10, check=True).stdout
        except (subprocess.SubprocessError, OSError):
            out = ""
        found = re.search(r"\bNodeAddr=(\S+)", out)
        if found:
            return found.group(1)
    return node  # may resolve on the compute nodes only


def slurm_master_port(job_id: str) -> int:
    """The rendezvous port of SLURM job ``job_id``: 20000 + id % 20000, so jobs that share a
    host (several slurmd on one machine, or two jobs on one node) rarely collide, and a requeued
    job (same id) finds its port again. Array tasks have ids of their own (SLURM_JOB_ID)."""
    digits = re.sub(r"\D", "", job_id.split("_")[0]) if job_id else ""
    return 20000 + int(digits) % 20000 if digits else DEFAULT_MASTER_PORT


def read_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """DistEnv from torchrun variables, else SLURM variables, else a single process.

    torchrun wins over SLURM so that `srun torchrun ...` (one task per node) works.
    """
    env = os.environ if environ is None else environ
    port = _int_var(env, "MASTER_PORT") if "MASTER_PORT" in env else None
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=_int_var(env, "RANK"),
            world_size=_int_var(env, "WORLD_SIZE"),
            local_rank=_int_var(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port or DEFAULT_MASTER_PORT,
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        job_id = env.get("SLURM_JOB_ID", "0")
        # A per-job port keeps two jobs sharing a node from colliding on the rendezvous.
        return DistEnv(
            rank=_int_var(env, "SLURM_PROCID"),
            world_size=_int_var(env, "SLURM_NTASKS"),
            local_rank=_int_var(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=env.get("MASTER_ADDR") or node_address(_first_slurm_host(nodelist)),
            master_port=port or slurm_master_port(job_id),
        )
    return DistEnv()


def default_backend() -> str:
    """NCCL where CUDA is present, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def collective_timeout_s(environ: Mapping[str, str] | None = None) -> float:
    """Seconds a collective may wait: ``$DETRFORGE_COLLECTIVE_TIMEOUT_S``, default 600."""
    env = os.environ if environ is None else environ
    text = env.get(COLLECTIVE_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_COLLECTIVE_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise DistEnvError(f"dist.py: {COLLECTIVE_TIMEOUT_ENV}={text!r} must be a positive "
                           "number of seconds (unset it for the default, 600)")
    return value


def init_distributed(env: DistEnv, backend: str | None = None,
                     timeout_s: float | None = None) -> None:
    """Initialise the default process group (also for world_size 1, which DeepSpeed expects).

    Exports the torchrun variables so that libraries reading them (DeepSpeed) agree with `env`.
    Every collective of the group fails after ``timeout_s`` (default: :func:`collective_timeout_s`)
    instead of waiting for ever on a rank that died. Idempotent: a second call with a group
    already up does nothing.
    """
    os.environ.update(
        RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port),
    )
    if torch_dist.is_initialized():
        return
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    timeout = timedelta(seconds=timeout_s if timeout_s is not None else collective_timeout_s())
    torch_dist.init_process_group(
        backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size,
        timeout=timeout,
    )


def is_initialized() -> bool:
    """True when a default process group exists."""
    return torch_dist.is_available() and torch_dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 without a process group."""
    return torch_dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Number of processes, 1 without a process group."""
    return torch_dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (the rank that logs and writes shared files)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if get_world_size() > 1:
        torch_dist.barrier()


def _reduce_device() -> torch.device:
    # NCCL only reduces CUDA tensors; gloo only CPU ones.
    if is_initialized() and torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value: float) -> float:
    """Sum of `value` over ranks."""
    if get_world_size() == 1:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_reduce_device())
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return float(tensor.item())


def all_reduce_mean(value: float) -> float:
    """Mean of `value` over ranks."""
    return all_reduce_sum(value) / get_world_size()


def all_reduce_max(value: float) -> float:
    """Max of `value` over ranks."""
    if get_world_size() == 1:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_reduce_device())
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return float(tensor.item())


def all_reduce_mean_dict(values: dict[str, float]) -> dict[str, float]:
    """Per-key mean over ranks in one collective; every rank must pass the same keys."""
    if get_world_size() == 1 or not values:
        return {key: float(value) for key, value in values.items()}
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                          device=_reduce_device())
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return {key: float(v) / get_world_size() for key, v in zip(keys, tensor.tolist())}


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on at least one; all ranks must call it."""
    return all_reduce_max(1.0 if flag else 0.0) > 0.5


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (picklable objects)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src, device=_reduce_device())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, indexed by rank."""
    if get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def shutdown() -> None:
    """Destroy the process group; avoids rare aborts at interpreter exit."""
    if is_initialized():
        torch_dist.destroy_process_group()


def exit_without_teardown(code: int) -> None:
    """End this process with ``code`` once its work is saved: stdio and logging flushed, the
    process group destroyed, the interpreter's teardown skipped.

    That teardown destroys the native threads of imported libraries (gloo; pyarrow, which
    DeepSpeed's pandas import pulls in), and now and then one of them is still joinable: the
    C++ runtime then aborts the finished process (``terminate called without an active
    exception``, exit -6; seen in about 1 of 15 two-rank DeepSpeed runs on a loaded 2-core
    machine, always after the last line of Python), and torchrun reports a stage that saved
    everything as failed.
    """
    shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
