"""Free host memory within the container's cgroup limit (v1 and v2), and `auto` placement choosing
against it rather than against the node's memory."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from pruning_core import memory
from pruning_core.memory import cgroup_available, choose_placement, free_memory, host_available

GIB = 2**30
NODE = 1024 * GIB  # the node behind the container: 1 TiB available


@pytest.fixture
def big_node(monkeypatch):
    import psutil

    vm = namedtuple("vm", "total available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: vm(NODE, NODE))


def cgroup_v2(root, limit, current, inactive_file=0):
    root.mkdir(parents=True, exist_ok=True)
    (root / "memory.max").write_text(f"{limit}\n")
    (root / "memory.current").write_text(f"{current}\n")
    (root / "memory.stat").write_text(f"anon {current}\nfile 0\ninactive_file {inactive_file}\nactive_file 0\n")
    return root


def cgroup_v1(root, limit, usage, inactive_file=0):
    d = root / "memory"
    d.mkdir(parents=True, exist_ok=True)
    (d / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (d / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (d / "memory.stat").write_text(f"cache 0\nrss {usage}\ntotal_inactive_file {inactive_file}\n")
    return root


def test_cgroup_v2_limit_minus_usage_with_reclaimable_cache_free(tmp_path):
    root = cgroup_v2(tmp_path / "v2", 32 * GIB, 5 * GIB, inactive_file=1 * GIB)
    assert cgroup_available(root) == 28 * GIB
    (root / "memory.max").write_text("max\n")
    assert cgroup_available(root) is None  # no limit


def test_cgroup_v1_limit_minus_usage(tmp_path):
    root = cgroup_v1(tmp_path / "v1", 32 * GIB, 2 * GIB, inactive_file=GIB // 2)
    assert cgroup_available(root) == 30 * GIB + GIB // 2
    assert cgroup_available(tmp_path / "none") is None  # no memory controller there


def test_no_limit_falls_back_to_the_node(tmp_path, big_node):
    unlimited = cgroup_v1(tmp_path / "v1", 9223372036854771712, GIB)  # v1's "no limit"
    assert host_available(unlimited) == (NODE, "node")
    assert host_available(tmp_path / "none") == (NODE, "node")
    assert host_available(cgroup_v2(tmp_path / "v2", 32 * GIB, 0)) == (32 * GIB, "cgroup")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_auto_placement_uses_the_cgroup_limit_not_the_nodes_memory(tmp_path, monkeypatch, big_node, version):
    """The shipped k8s template gives a pod 32 Gi on a node with far more: a 40 GiB model must not be
    put in host memory because the node has 1 TiB."""
    make = cgroup_v1 if version == "v1" else cgroup_v2
    root = make(tmp_path / version, 32 * GIB, 4 * GIB)
    sizes = {"total": 40 * GIB, "layers": 38 * GIB, "layer_max": GIB, "other": 2 * GIB}
    cpu = torch.device("cpu")

    monkeypatch.setattr(memory, "CGROUP_ROOT", tmp_path / "no-cgroup")
    assert free_memory(cpu) == (NODE, NODE)
    assert choose_placement("auto", sizes, GIB, cpu)[0] == "device"  # what psutil alone would choose

    monkeypatch.setattr(memory, "CGROUP_ROOT", root)
    assert free_memory(cpu) == (28 * GIB, 28 * GIB)
    place, why = choose_placement("auto", sizes, GIB, cpu)
    assert place == "disk" and "28.00 GiB" in why, why

    # a GPU of 16 GiB: the layers (38 GiB) fit the node's memory, not the pod's -> disk, not offload
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (16 * GIB, 80 * GIB))
    cuda = torch.device("cuda")
    assert free_memory(cuda) == (16 * GIB, 28 * GIB)
    assert choose_placement("auto", sizes, GIB, cuda)[0] == "disk"
    monkeypatch.setattr(memory, "CGROUP_ROOT", tmp_path / "no-cgroup")
    assert choose_placement("auto", sizes, GIB, cuda)[0] == "offload"
