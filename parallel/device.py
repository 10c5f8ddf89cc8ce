"""Device layer: which accelerator this rank drives and how its ranks talk.

One decision, made once per process, before anything else touches a device:

  type   torch device   dist backend   DS_ACCELERATOR
  cuda   cuda:LOCAL_RANK  nccl         cuda
  npu    npu:LOCAL_RANK   hccl         npu    (Ascend, via torch_npu)
  cpu    cpu              gloo         cpu

`auto` takes CUDA when torch sees a GPU, else an NPU when `torch_npu` imports
and reports a device, else the CPU. An explicit choice that the machine cannot
honour is an error naming `parallel.device`, never a silent fallback: a job
meant for 8 NPUs must not quietly train on one CPU.

Why the NPU path never calls into `torch.cuda`: on Ascend hosts CUDA is absent,
and some torch_npu setups patch `torch.cuda` (transfer_to_npu), so a stray
`torch.cuda.set_device` either fails or acts on the wrong device. Only
`auto` asks `torch.cuda.is_available()`, and only as its first question.

DeepSpeed picks its accelerator when it is first imported, from the
`DS_ACCELERATOR` environment variable: `DeviceSpec.activate()` sets it, so call
it before `import deepspeed` (or anything that imports it).
"""
from __future__ import annotations

import importlib
import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from jobconfig.errors import ConfigError

_BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


@dataclass(frozen=True)
class DeviceSpec:
    """The device this process uses, and what the distributed stack needs to know about it."""
    type: str              # "cuda" | "npu" | "cpu"
    device: torch.device   # the local rank's device
    backend: str           # torch.distributed backend: nccl | hccl | gloo
    accelerator: str       # DeepSpeed's DS_ACCELERATOR name: cuda | npu | cpu
    local_rank: int = 0

    def activate(self) -> "DeviceSpec":
        """Make this device current and tell DeepSpeed which accelerator to use.

        Sets `DS_ACCELERATOR` only when unset or equal: a user's explicit
        setting that disagrees with the chosen device is an error, not overwritten.
        """
        current = os.environ.get("DS_ACCELERATOR")
        if current not in (None, "", self.accelerator):
            raise ConfigError(f"parallel.device: selected {self.type!r} but the environment has "
                              f"DS_ACCELERATOR={current!r}; unset it or choose parallel.device={current!r}")
        os.environ["DS_ACCELERATOR"] = self.accelerator
        if self.type == "cuda":
            torch.cuda.set_device(self.device)
        elif self.type == "npu":
            torch.npu.set_device(self.device.index)
        return self


def _local_rank(local_rank: int | None) -> int:
    if local_rank is not None:
        return local_rank
    return int(os.environ.get("LOCAL_RANK", "0"))


def _npu_module():
    """`torch.npu` after importing torch_npu (which registers it), or None when torch_npu is absent."""
    try:
        importlib.import_module("torch_npu")
    except ImportError:
        return None
    return getattr(torch, "npu", None)


def _check_index(kind: str, local_rank: int, count: int) -> None:
    if not 0 <= local_rank < count:
        raise ConfigError(f"parallel.device={kind!r}: local rank {local_rank} but only {count} "
                          f"{kind} device(s) visible on this host (check LOCAL_RANK / nproc_per_node)")


def select_device(requested: str = "auto", local_rank: int | None = None) -> DeviceSpec:
    """Choose the device for this process; `requested` is `ParallelConfig.device`.

    `local_rank` defaults to the LOCAL_RANK environment variable (torchrun,
    deepspeed launcher), else 0. Touches no device state: `activate()` does.
    """
    if requested not in ("auto", *_BACKENDS):
        raise ConfigError(f"parallel.device: got {requested!r}, expected one of ['auto', 'cpu', 'cuda', 'npu']")
    rank = _local_rank(local_rank)
    kind = requested
    if requested == "auto":
        if torch.cuda.is_available():
            kind = "cuda"
        else:
            npu = _npu_module()
            kind = "npu" if npu is not None and npu.is_available() else "cpu"

    if kind == "cuda":
        if requested == "cuda" and not torch.cuda.is_available():
            raise ConfigError("parallel.device='cuda' but torch sees no CUDA device "
                              f"(torch {torch.__version__}); use parallel.device=auto or cpu")
        _check_index("cuda", rank, torch.cuda.device_count())
        device = torch.device("cuda", rank)
    elif kind == "npu":
        npu = _npu_module()
        if npu is None:
            raise ConfigError("parallel.device='npu' but torch_npu is not importable "
                              "(install the torch_npu build matching the host's CANN toolkit)")
        if not npu.is_available():
            raise ConfigError("parallel.device='npu' but torch_npu reports no available NPU")
        _check_index("npu", rank, npu.device_count())
        device = torch.device("npu", rank)
    else:
        device = torch.device("cpu")
    return DeviceSpec(type=kind, device=device, backend=_BACKENDS[kind], accelerator=kind, local_rank=rank)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int


def free_port() -> int:
    """A free TCP port on loopback (single-process rendezvous, local torchrun)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_loopback(addr: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if not addr:
        return False
    if addr.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr.strip("[]")).is_loopback
    except ValueError:
        return False


def loopback_interface() -> str:
    """The name of the loopback network interface ('lo' on Linux, 'lo0' on macOS)."""
    try:
        names = [n for _, n in socket.if_nameindex()]
    except OSError:
        names = []
    return next((n for n in names if n in ("lo", "lo0")), next((n for n in names if n.startswith("lo")), "lo"))


def loopback_store(addr: str, port: int, world_size: int, is_master: bool, timeout: timedelta,
                   multi_tenant: bool = False) -> "dist.TCPStore":
    """A TCPStore whose server listens on the loopback address `addr` only.

    TCPStore's own server listens on every interface ([::]:PORT, no authentication) whatever
    host name it is given; handing it a socket already bound to loopback keeps it off the network.
    """
    if not is_master:
        return dist.TCPStore(addr, port, world_size, False, timeout)
    host = "::1" if ":" in addr.strip("[]") else ("127.0.0.1" if addr.lower() == "localhost" else addr.strip("[]"))
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(max(128, world_size or 0))
        bound_port = sock.getsockname()[1]  # the port asked for, or the one chosen for port 0
        fd = sock.detach()   # the store owns the descriptor from here on
    except BaseException:
        sock.close()
        raise
    try:
        return dist.TCPStore(host, bound_port, world_size, True, timeout, multi_tenant=multi_tenant,
                             master_listen_fd=fd)
    except BaseException:
        os.close(fd)
        raise


def _bind_loopback_if_local(spec: DeviceSpec) -> None:
    """Single-node run on loopback: keep gloo's pair sockets on loopback too (gloo otherwise
    listens on the address the host name resolves to). A user's GLOO_SOCKET_IFNAME wins."""
    if spec.backend == "gloo" and is_loopback(os.environ.get("MASTER_ADDR")) and not os.environ.get("GLOO_SOCKET_IFNAME"):
        os.environ["GLOO_SOCKET_IFNAME"] = loopback_interface()


def init_process_group(spec: DeviceSpec, timeout_s: float = 1800.0) -> DistInfo:
    """Join the job's default process group with the device's backend, once per process.

    Under torchrun (or the DeepSpeed launcher, or a test harness) RANK,
    WORLD_SIZE, MASTER_ADDR and MASTER_PORT come from the environment; without
    them a 1-rank group is made in process (a HashStore: nothing listens at all),
    since DeepSpeed always wants one. When MASTER_ADDR is a loopback address,
    rank 0 serves the store on loopback only, and gloo binds loopback.
    A no-op when a group already exists, but the backends must agree.
    """
    if dist.is_initialized():
        have = dist.get_backend()
        if have != spec.backend:
            raise ConfigError(f"parallel.device={spec.type!r} needs backend {spec.backend!r}, "
                              f"but the process group was started with {have!r}")
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=timeout_s)
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        _bind_loopback_if_local(spec)
        dist.init_process_group(backend=spec.backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
        return DistInfo(0, 1, 0)
    _bind_loopback_if_local(spec)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    addr, port = os.environ.get("MASTER_ADDR", ""), int(os.environ.get("MASTER_PORT", "0") or 0)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # The launcher's agent serves the store (orchestration.launch.local_torchrun binds it to
        # loopback for local runs). Under torchrun the rendezvous store outlives a failed attempt; give
        # every attempt its own key space, or the restarted ranks read the dead ranks' addresses and
        # gloo cannot connect.
        base = dist.TCPStore(addr, port, world, is_master=False, timeout=timedelta(minutes=30))
        dist.init_process_group(backend=spec.backend, store=dist.PrefixStore(f"vgpt/attempt_{restart or 0}/", base),
                                rank=rank, world_size=world, timeout=timeout)
    elif is_loopback(addr) and port:
        store = loopback_store(addr, port, world, rank == 0, timeout)
        dist.init_process_group(backend=spec.backend, store=store, rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend=spec.backend, timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def destroy_process_group() -> None:
    """Tear the default process group down before the interpreter exits. Left to the static
    destructors at exit, the backend's threads race the teardown (seen once on gloo: a rank aborted
    with "terminate called without an active exception" after a run had finished)."""
    if dist.is_initialized():
        dist.destroy_process_group()
