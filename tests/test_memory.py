"""The free memory the pre-flight check compares its estimate with."""

from collections import namedtuple

import pytest
import torch

from ldmkit import memory
from ldmkit.errors import InvalidRequest
from ldmkit.memory import Footprint, available_bytes, check_memory, estimate_peak_bytes

GiB = 2**30
MODEL = Footprint(
    dtype=torch.float16, vae_scale_factor=8, unet_channels=320, vae_channels=128, context_dim=768, attention_width=1280
)


def test_cpu_free_memory_is_psutils_available_memory(monkeypatch):
    VirtualMemory = namedtuple("VirtualMemory", "total available")
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: VirtualMemory(total=64 * GiB, available=5 * GiB))
    assert available_bytes(torch.device("cpu")) == 5 * GiB


def test_cpu_free_memory_is_real_and_below_the_total():
    import psutil

    free = available_bytes(torch.device("cpu"))
    assert 0 < free <= psutil.virtual_memory().total


class FakeCuda:
    """A 10 GiB GPU whose caching allocator holds `reserved` bytes, `allocated` of them in use."""

    def __init__(self, reserved: int, allocated: int, total: int = 10 * GiB):
        self.reserved, self.allocated, self.total = reserved, allocated, total

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (self.total - self.reserved, self.total))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: self.reserved)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.allocated)


def test_cuda_memory_reserved_but_unused_by_pytorch_counts_as_free(monkeypatch):
    FakeCuda(reserved=6 * GiB, allocated=2 * GiB).install(monkeypatch)
    # the driver sees 4 GiB free; 4 GiB more sit in PyTorch's cache, free to the next request
    assert available_bytes(torch.device("cuda")) == 8 * GiB


def test_a_second_identical_request_is_not_refused_after_the_first_left_its_blocks_cached(monkeypatch):
    cuda = torch.device("cuda")
    need = estimate_peak_bytes(MODEL, 1024, 1024, 4, True)
    assert 4 * GiB < need < 7 * GiB  # fits an idle 10 GiB card, not one whose cache the driver counts as taken
    FakeCuda(reserved=0, allocated=0).install(monkeypatch)
    check_memory(MODEL, cuda, 1024, 1024, 4, True)  # the first request
    FakeCuda(reserved=need, allocated=0).install(monkeypatch)  # it finished; its blocks stay reserved
    check_memory(MODEL, cuda, 1024, 1024, 4, True)  # the same request again
    FakeCuda(reserved=need, allocated=need).install(monkeypatch)  # memory really in use still counts as taken
    with pytest.raises(InvalidRequest, match=r"need about 6\.3 GiB on cuda, but only 3\.7 GiB is free"):
        check_memory(MODEL, cuda, 1024, 1024, 4, True)
