"""Distributed runs: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; these helpers do nothing in a single process."""
import os

import torch

from errors import ConfigError


def init_distributed(device):
    """Join the process group torchrun describes, if any. Returns (device, rank, world_size): under torchrun
    a CUDA device becomes cuda:LOCAL_RANK (NCCL backend); a CPU device uses the gloo backend. A CUDA device is
    made the current one, so that what asks the current GPU (its random state, bf16 support, the memory cache)
    asks this one, --device cuda:1 included."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device.type == "cuda" and world_size > 1:
        local_rank, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local_rank >= gpus:
            raise ConfigError(f"torchrun started process {local_rank} on a machine with {gpus} GPU(s): one process "
                              f"per GPU; use --nproc_per_node={gpus} (or --device cpu)")
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return device, 0, 1
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, torch.distributed.get_rank(), world_size


def is_distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_sum(tensor):
    """Sum a tensor over all processes in place (nothing to do in a single process); returns it."""
    if is_distributed():
        torch.distributed.all_reduce(tensor)
    return tensor


def average_across_processes(tensors):
    """Replace each floating-point tensor by its mean over the processes, in place."""
    if is_distributed():
        for tensor in tensors:
            if tensor.is_floating_point():
                torch.distributed.all_reduce(tensor)
                tensor /= torch.distributed.get_world_size()


def all_gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...]; [obj] in a single process."""
    if not is_distributed():
        return [obj]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
