"""One plan for every process of a run: rank 0 decides, the others receive its choice.

The run directory, the checkpoint to resume and the seed must be the same in every process. Each
node's Hydra computes its own timestamped run directory, and each process would resolve
`ckpt_path=last` on its own (a deadlock when two resolve different files), so global rank 0
decides and shares its plan:
- with processes that Lightning launches itself (one node, several devices), through the
  environment they inherit;
- with processes started by a scheduler or by hand (srun, torchrun, one `python train.py` per
  node), through the process group, which is set up here, before the Trainer, and which Lightning
  then reuses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from nanollm.errors import NanoLLMError, SweepError

PLAN_ENV = "NANOLLM_RUN_PLAN"
DISTRIBUTED_STRATEGIES = ("ddp", "fsdp", "deepspeed")


def devices_per_node(trainer_cfg: DictConfig) -> int:
    """How many processes one node runs, as Lightning will count them."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, str) and devices.isdigit():
        return int(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if hasattr(devices, "__len__"):
        return len(devices)
    # "auto" / -1: every GPU on a GPU machine, one process on a CPU.
    import torch

    uses_cuda = str(trainer_cfg.get("accelerator")) in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    return torch.cuda.device_count() if uses_cuda else 1


def world_size(trainer_cfg: DictConfig) -> int:
    strategy = str(trainer_cfg.get("strategy", "auto"))
    if not any(name in strategy for name in DISTRIBUTED_STRATEGIES):
        return 1
    return devices_per_node(trainer_cfg) * int(trainer_cfg.get("num_nodes", 1) or 1)


def processes_started_externally(trainer_cfg: DictConfig) -> bool:
    """True when every process of the run is started by something else than Lightning (SLURM's srun,
    torchrun, or one command per node), so none of them will launch the others."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return (
        SLURMEnvironment.detect()
        or TorchElasticEnvironment.detect()
        or "LOCAL_RANK" in os.environ
        or devices_per_node(trainer_cfg) == 1
    )


def shared_plan(trainer_cfg: DictConfig, decide: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Rank 0's `decide()`, in every process. A user error in rank 0's decision is raised everywhere."""
    inherited = os.environ.get(PLAN_ENV)
    if inherited is not None and os.environ.get("LOCAL_RANK", "0") != "0":
        return _unpack(json.loads(inherited))  # launched by Lightning from rank 0, which put its plan here
    if world_size(trainer_cfg) == 1:
        return decide()
    if not processes_started_externally(trainer_cfg):
        plan = decide()  # this process is rank 0 and launches the others when training starts
        os.environ[PLAN_ENV] = json.dumps(plan)
        return plan
    import torch.distributed as dist

    rank = _init_process_group(trainer_cfg)
    box = [_decide_or_error(decide) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return _unpack(box[0])


def _decide_or_error(decide: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return decide()
    except NanoLLMError as err:
        return {"error": str(err)}


def _unpack(plan: dict[str, Any]) -> dict[str, Any]:
    if "error" in plan:
        raise NanoLLMError(plan["error"])
    return plan


def _init_process_group(trainer_cfg: DictConfig) -> int:
    """Set up the default process group the way Lightning's DDP strategy would; returns the global rank.

    Lightning finds it initialised and keeps it (`_init_dist_connection` returns early).
    """
    import torch
    import torch.distributed as dist
    from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment, TorchElasticEnvironment
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    devices = devices_per_node(trainer_cfg)
    if SLURMEnvironment.detect():
        env = SLURMEnvironment()
    elif TorchElasticEnvironment.detect():
        env = TorchElasticEnvironment()
    else:
        env = LightningEnvironment()
        env.set_world_size(world_size(trainer_cfg))
        env.set_global_rank(env.node_rank() * devices + env.local_rank())
    os.environ["MASTER_ADDR"] = env.main_address
    os.environ["MASTER_PORT"] = str(env.main_port)
    uses_cuda = str(trainer_cfg.get("accelerator")) in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    if uses_cuda:
        torch.cuda.set_device(env.local_rank())
    if not dist.is_initialized():
        dist.init_process_group("nccl" if uses_cuda else "gloo", rank=env.global_rank(), world_size=env.world_size())
    rank_zero_only.rank = env.global_rank()  # so only rank 0 prints, before Lightning sets it too
    return env.global_rank()


def check_multirun_can_launch(trainer_cfg: DictConfig) -> None:
    """Inside a Hydra multirun, Lightning cannot start DDP processes: it re-runs the script with the
    original command line, `-m` included, so every process would start a sweep of its own."""
    if world_size(trainer_cfg) > 1 and not processes_started_externally(trainer_cfg):
        raise SweepError(
            "a sweep (-m, or an experiment that sweeps) cannot launch DDP processes: Lightning would re-run the "
            "whole sweep in each one. Run each configuration as its own command (python train.py trainer=ddp ...), "
            "or sweep with hydra/launcher=slurm, where SLURM starts the processes."
        )


def share_machine_among_parallel_jobs(trainer_cfg: DictConfig, launcher_cfg, job_num: int) -> None:
    """Jobs of a parallel local sweep (hydra/launcher=joblib) share one machine: each uses cores / n_jobs
    threads and, on a machine with several GPUs, GPU `job_num % count` (unless trainer.devices names one)."""
    import torch

    cores = os.cpu_count() or 1
    n_jobs = int(launcher_cfg.get("n_jobs", -1) or -1)
    parallel = n_jobs if n_jobs > 0 else max(cores + 1 + n_jobs, 1)  # joblib: -1 = all cores, -2 = all but one
    torch.set_num_threads(max(cores // parallel, 1))
    if str(trainer_cfg.get("accelerator")) in ("gpu", "cuda", "auto") and torch.cuda.device_count() > 1:
        if trainer_cfg.get("devices") in (1, "1", "auto"):
            trainer_cfg.devices = [job_num % torch.cuda.device_count()]
