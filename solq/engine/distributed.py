"""Process groups and cross-rank helpers for torchrun (env://), single- and multi-node.

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; under SLURM without torchrun
(``srun python -m solq.cli train ...``) the SLURM_* variables are translated to the same names. Without
any of them the run is a single process and every helper here degrades to a no-op.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo", "init_distributed", "cleanup", "is_dist", "get_rank", "get_world_size", "is_main_process",
    "barrier", "all_gather_object", "broadcast_object", "all_reduce_mean", "any_rank", "resolve_device",
]


@dataclass
class DistInfo:
    """Where this process sits: global ``rank`` of ``world_size``, ``local_rank`` on its node, ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_from_slurm() -> None:
    """Map SLURM task variables onto the torchrun names when a job was started by srun without torchrun."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
        raise RuntimeError(f"SLURM job with {os.environ['WORLD_SIZE']} tasks but MASTER_ADDR is not set; export "
                           f"MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1) "
                           f"(nodes: {nodes!r}) or launch with torchrun (see scripts/slurm_train.sh)")


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """Turn ``runtime.device`` into a torch.device.

    "auto" picks the accelerator of this build (cuda:LOCAL_RANK when CUDA is available) and the CPU
    otherwise; "cuda" becomes cuda:LOCAL_RANK so every process of a node gets its own GPU.
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type != "cpu" and device.index is None:
        device = torch.device(device.type, local_rank)
    return device


def init_distributed(backend: str = "auto", device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group described by the environment (torchrun / SLURM), or run alone.

    ``backend`` "auto" is NCCL on CUDA and gloo otherwise. Returns the DistInfo of this process; the
    device is set as the current CUDA device so NCCL collectives use it.
    """
    _env_from_slurm()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world < 2:
        return DistInfo(0, 1, 0, dev, "")
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", world_size=world, rank=rank,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistInfo(rank, world, local_rank, dev, backend)


def cleanup() -> None:
    """Leave the process group (if any)."""
    if is_dist():
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_gather_object(obj: Any) -> list:
    """Picklable ``obj`` from every rank, as a list indexed by rank (``[obj]`` when not distributed)."""
    if not is_dist():
        return [obj]
    out: list = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a tensor of any shape (a copy; the input is not modified)."""
    if not is_dist():
        return values.clone()
    out = values.clone()
    dist.all_reduce(out)
    return out / get_world_size()


def any_rank(flag: bool, device: torch.device = torch.device("cpu")) -> bool:
    """True on every rank when ``flag`` is True on at least one (``flag`` itself when not distributed).
    ``device`` must be one the backend reduces on (the rank's GPU for NCCL)."""
    if not is_dist():
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)
