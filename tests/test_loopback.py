"""Local runs keep every listening socket on loopback (issue "Fail loudly, lose nothing", B): the
rendezvous store and gloo's pair sockets of a single-node run never listen on 0.0.0.0 / [::]."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.parallel_harness import run_ranks
from tests.sockets import HAS_PROC_NET, REPO, is_loopback, listening

# every test here starts a process group (or reads the sockets of shared runs that did)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAS_PROC_NET, reason="needs Linux /proc/net/tcp")]


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
            "from tests.sockets import listening\n"
            "print('\\n'.join(listening([os.getpid()])))\n"
            "dist.destroy_process_group()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr[-2000:]
    seen = r.stdout.split()
    assert seen, "expected the process group's store to be seen listening"  # else all() below is vacuous
    assert all(is_loopback(a) for a in seen), seen


def test_local_torchrun_run_listens_on_loopback_only(two_rank_zero2_watched):
    """A 2-process training run under the loopback torchrun (`vgpt train --nproc 2`, the shared ZeRO-2 run
    of tests/conftest.py): every listening socket of its whole process tree was polled while it ran."""
    _, seen = two_rank_zero2_watched
    assert seen, "expected the rendezvous store to be seen listening"
    assert all(is_loopback(a) for a in seen), sorted(seen)


def test_rendered_single_node_torchrun_binds_loopback_only(rendered_torchrun):
    """The rendered local torchrun.sh (local-cpu cluster: 1 node x 2 processes) rendezvouses on
    127.0.0.1 through the loopback torchrun, and nothing of it listens beyond loopback."""
    meta, _, returncode, log, seen = rendered_torchrun
    assert "--local-addr=127.0.0.1" in meta["torchrun_argv"]
    assert meta["launcher"][:2] == ["-m", "orchestration.launch.local_torchrun"]
    assert meta["env"].get("GLOO_SOCKET_IFNAME") == "lo"
    assert returncode == 0, log[-3000:]
    assert seen and all(is_loopback(a) for a in seen), sorted(seen)
