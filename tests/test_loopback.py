"""Local runs keep every listening socket on loopback (issue "Fail loudly, lose nothing", B): the
rendezvous store and gloo's pair sockets of a single-node run never listen on 0.0.0.0 / [::]."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.parallel_harness import free_port, run_ranks

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")


def _decode(hexaddr: str) -> str:
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    if len(raw) == 4:
        return ".".join(str(b) for b in raw[::-1]) + f":{int(port, 16)}"
    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]   # /proc stores each 32-bit word host-endian
    import ipaddress
    return f"[{ipaddress.IPv6Address(b''.join(words))}]:{int(port, 16)}"


def listening(pids) -> list[str]:
    """Local addresses of the TCP sockets in LISTEN state (0A) that the processes `pids` hold."""
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                p = line.split()
                if p[3] == "0A" and p[9] in inodes:
                    out.append(_decode(p[1]))
    return out


def is_loopback(addr: str) -> bool:
    host = addr.rsplit(":", 1)[0].strip("[]")
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1")


def descendants(root: int) -> set[int]:
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = {root}, [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in out]
        out.update(kids)
        todo += kids
    return out


def _rank_sockets(rank: int, world: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    dist.all_reduce(torch.ones(4))
    Path(out_dir, f"rank{rank}.txt").write_text("\n".join(listening([os.getpid()])))
    dist.barrier()


def test_harness_ranks_store_and_gloo_listen_on_loopback_only(tmp_path):
    run_ranks(_rank_sockets, 2, (str(tmp_path),))
    seen = [a for r in range(2) for a in (tmp_path / f"rank{r}.txt").read_text().split()]
    assert seen, "expected the store and gloo to listen somewhere"
    assert all(is_loopback(a) for a in seen), seen


def test_single_process_group_listens_on_nothing_public():
    code = ("import os, torch, torch.distributed as dist\n"
            "from parallel.device import init_process_group, select_device\n"
            "for k in ('WORLD_SIZE','RANK','MASTER_ADDR','MASTER_PORT','GLOO_SOCKET_IFNAME'): os.environ.pop(k, None)\n"
            "init_process_group(select_device('cpu'))\n"
            "dist.all_reduce(torch.ones(1))\n"
            "from tests.test_loopback import listening\n"
            "print('\\n'.join(listening([os.getpid()])))\n"
            "dist.destroy_process_group()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(is_loopback(a) for a in r.stdout.split()), r.stdout


def run_watching_sockets(cmd: list[str], env: dict) -> tuple[int, str, set[str]]:
    """Run `cmd` from the repo, polling the listening sockets of its whole process tree until it ends
    (10 minutes at most): (exit code, output, every address seen listening)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: set[str] = set()
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        seen.update(listening(descendants(proc.pid)))
        time.sleep(0.1)
    out = proc.communicate(timeout=60)[0] if proc.poll() is not None else (proc.kill() or "timed out")
    return proc.returncode, out, seen


def test_local_torchrun_run_listens_on_loopback_only(tmp_path):
    """A tiny 2-process training run under the loopback torchrun (what `vgpt train --nproc 2` spawns):
    poll every listening socket of the whole process tree while it runs."""
    cmd = [sys.executable, "-m", "orchestration.launch.local_torchrun", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--max_restarts=0",
           "-m", "orchestration.cli", "train", "--config", "configs/debug.yaml", f"--train.out_dir={tmp_path / 'run'}",
           "--train.steps=2", "--parallel.precision=fp32", "--train.tensorboard=false", "--synthetic.frames=6",
           "--model.attention=blockwise"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("GLOO_SOCKET_IFNAME", None)
    returncode, out, seen = run_watching_sockets(cmd, env)
    assert returncode == 0, out[-3000:]
    assert seen, "expected the rendezvous store to be seen listening"
    assert all(is_loopback(a) for a in seen), sorted(seen)


LAUNCH_TINY = ["--model.preset=debug", "--model.attention=blockwise", "--train.data=synthetic", "--train.steps=2",
               "--train.log_every=1", "--parallel.precision=fp32", "--parallel.sequence_parallel=1",
               "--parallel.activation_checkpointing=false", "--train.tensorboard=false"]


def test_rendered_single_node_torchrun_binds_loopback_only(tmp_path):
    """The rendered local torchrun.sh (local-cpu cluster: 1 node x 2 processes) rendezvouses on
    127.0.0.1 through the loopback torchrun, and nothing of it listens beyond loopback."""
    import json

    from orchestration.launch.plan import plan_launch, render
    out = tmp_path / "run"
    spec = plan_launch(1, str(REPO / "configs/cluster/local-cpu.yaml"),
                       overrides=[*LAUNCH_TINY, f"--train.out_dir={out}"],
                       cluster_overrides=[f"--rendezvous.port={free_port()}", f"--python={sys.executable}",
                                          f"--workdir={REPO}"])
    render(spec, "torchrun", tmp_path / "launch")
    meta = json.loads((tmp_path / "launch" / "launch.json").read_text())
    assert "--local-addr=127.0.0.1" in meta["torchrun_argv"]
    assert meta["launcher"][:2] == ["-m", "orchestration.launch.local_torchrun"]
    assert meta["env"].get("GLOO_SOCKET_IFNAME") == "lo"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("GLOO_SOCKET_IFNAME", None)
    returncode, log, seen = run_watching_sockets(["bash", str(tmp_path / "launch" / "torchrun.sh")], env)
    assert returncode == 0, log[-3000:]
    assert seen and all(is_loopback(a) for a in seen), sorted(seen)
