"""distributed.init_distributed with CUDA mocked: the chosen GPU becomes the current one, and torchrun with more
processes than GPUs is one line, not CUDA's traceback."""
import pytest
import torch

from distributed import init_distributed
from errors import ConfigError


@pytest.fixture
def two_gpus(monkeypatch):
    current = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: None)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    return current


def test_a_single_process_makes_its_gpu_the_current_one(two_gpus, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed(torch.device("cuda:1")) == (torch.device("cuda:1"), 0, 1)
    assert two_gpus == [torch.device("cuda:1")]  # so bf16 support and the RNG state are asked of cuda:1


def test_a_cpu_run_touches_no_gpu(two_gpus, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed(torch.device("cpu")) == (torch.device("cpu"), 0, 1) and two_gpus == []


def test_torchrun_takes_the_gpu_of_its_local_rank(two_gpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert init_distributed(torch.device("cuda"))[0] == torch.device("cuda:1") and two_gpus == [torch.device("cuda:1")]


def test_torchrun_with_more_processes_than_gpus_is_one_line(two_gpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError, match=r"process 2 on a machine with 2 GPU\(s\).*--nproc_per_node=2"):
        init_distributed(torch.device("cuda"))
    assert two_gpus == []
