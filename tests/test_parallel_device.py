"""Device selection (cuda | npu | cpu) and parallel-layout validation, before any process group starts."""
from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from jobconfig.errors import ConfigError
from jobconfig.loader import load_config
from parallel.device import select_device
from parallel.dims import ParallelDims


def test_this_machine_gets_cpu_and_gloo(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    for requested in ("auto", "cpu"):
        spec = select_device(requested, local_rank=0)
        assert (spec.type, spec.device, spec.backend, spec.accelerator) == ("cpu", torch.device("cpu"), "gloo", "cpu")
    spec.activate()
    assert os.environ["DS_ACCELERATOR"] == "cpu"


# The fake NPU renames torch's PrivateUse1 backend to "npu", as the real torch_npu does:
# process-wide and irreversible, and it breaks libraries that probe device modules later
# (diffusers). So the NPU tests run in a fresh interpreter, started by the test below.
IN_NPU_PROCESS = os.environ.get("VGPT_FAKE_NPU_PROCESS") == "1"
npu_process_only = pytest.mark.skipif(not IN_NPU_PROCESS, reason="runs inside test_npu_paths_in_a_fresh_process")


def test_npu_paths_in_a_fresh_process():
    import subprocess
    if IN_NPU_PROCESS:
        pytest.skip("this is the fresh process")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "npu"],
                         env=dict(os.environ, VGPT_FAKE_NPU_PROCESS="1"), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "2 passed" in res.stdout, res.stdout[-2000:]


@pytest.fixture
def fake_npu(monkeypatch):
    """A `torch_npu` that registers `torch.npu` (3 devices), with every CUDA entry point rigged to fail."""
    calls = []
    npu = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 3,
                                set_device=lambda i: calls.append(("set_device", i)))
    module = types.ModuleType("torch_npu")
    # what importing the real torch_npu does first; process-wide and irreversible (see above)
    if torch._C._get_privateuse1_backend_name() != "npu":
        torch.utils.rename_privateuse1_backend("npu")
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setattr(torch, "npu", npu, raising=False)

    def cuda_touched(*a, **k):
        raise AssertionError("CUDA was touched on the NPU path")
    for name in ("is_available", "device_count", "set_device", "current_device", "init"):
        monkeypatch.setattr(torch.cuda, name, cuda_touched)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    return calls


@npu_process_only
def test_npu_path_selects_hccl_and_npu_devices_without_touching_cuda(fake_npu, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    spec = select_device("npu")
    assert (spec.type, spec.backend, spec.accelerator, spec.local_rank) == ("npu", "hccl", "npu", 2)
    assert spec.device == torch.device("npu", 2)
    spec.activate()
    assert fake_npu == [("set_device", 2)]
    assert os.environ["DS_ACCELERATOR"] == "npu"
    with pytest.raises(ConfigError, match="local rank 3 but only 3 npu"):
        select_device("npu", local_rank=3)


@npu_process_only
def test_auto_prefers_cuda_then_npu(fake_npu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto's one CUDA question
    spec = select_device("auto", local_rank=1)
    assert (spec.type, spec.device, spec.backend) == ("npu", torch.device("npu", 1), "hccl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    spec = select_device("auto", local_rank=1)
    assert (spec.type, spec.device, spec.backend, spec.accelerator) == ("cuda", torch.device("cuda", 1), "nccl", "cuda")


def test_unavailable_explicit_devices_are_config_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="parallel.device='cuda'"):
        select_device("cuda")
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu -> ImportError
    with pytest.raises(ConfigError, match="torch_npu is not importable"):
        select_device("npu")
    assert select_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match="parallel.device: got 'tpu'"):
        select_device("tpu")


def test_activate_refuses_a_conflicting_ds_accelerator(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    with pytest.raises(ConfigError, match="DS_ACCELERATOR='cuda'"):
        select_device("cpu").activate()


def test_parallel_dims_arithmetic_and_rank_layout():
    dims = ParallelDims(world_size=16, tp=2, sp=4)
    assert dims.dp == 2
    # megatron's tp-cp-dp order: TP fastest, then SP, then DP
    assert [dims.coords(r) for r in (0, 1, 2, 7, 8, 15)] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 3, 0),
                                                                (0, 0, 1), (1, 3, 1)]


def test_bad_layouts_fail_before_any_process_group_with_keys_and_numbers():
    with pytest.raises(ConfigError, match=r"^parallel.tensor_parallel=3 x parallel.sequence_parallel=1 "
                                          r"does not divide world size 2$"):
        ParallelDims(world_size=2, tp=3, sp=1)
    with pytest.raises(ConfigError, match="parallel.sequence_parallel: got 0"):
        ParallelDims(world_size=2, sp=0)
    cfg = load_config(None, ["--parallel.tensor_parallel=3"])  # debug model: 4 heads, mlp 172
    with pytest.raises(ConfigError, match=r"parallel.tensor_parallel=3 does not divide model.num_heads=4"):
        ParallelDims.from_config(cfg.parallel, 3, cfg.model)
    cfg = load_config(None, ["--parallel.sequence_parallel=3"])
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel=3 does not divide model.num_heads=4"):
        ParallelDims.from_config(cfg.parallel, 6, cfg.model)
    cfg = load_config(None, ["--parallel.tensor_parallel=2", "--parallel.sequence_parallel=4"])
    with pytest.raises(ConfigError, match=r"sequence_parallel=4 does not divide the 2 heads per tensor-parallel"):
        ParallelDims.from_config(cfg.parallel, 8, cfg.model)
    cfg = load_config(None, ["--parallel.tensor_parallel=4", "--model.num_heads=8", "--model.mlp_size=170"])
    with pytest.raises(ConfigError, match=r"tensor_parallel=4 does not divide model.mlp_size=170"):
        ParallelDims.from_config(cfg.parallel, 4, cfg.model)
    ok = load_config(None, ["--parallel.tensor_parallel=2", "--parallel.sequence_parallel=2"])
    assert ParallelDims.from_config(ok.parallel, 8, ok.model).dp == 2
