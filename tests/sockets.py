"""Which TCP sockets a process tree listens on, read from Linux's /proc (tests/test_loopback.py and the
watched runs of tests/conftest.py): how the tests show that local runs listen on loopback only."""
from __future__ import annotations

import ipaddress
import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HAS_PROC_NET = Path("/proc/net/tcp").exists()


def _decode(hexaddr: str) -> str:
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    if len(raw) == 4:
        return ".".join(str(b) for b in raw[::-1]) + f":{int(port, 16)}"
    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]   # /proc stores each 32-bit word host-endian
    return f"[{ipaddress.IPv6Address(b''.join(words))}]:{int(port, 16)}"


def listening(pids) -> list[str]:
    """Local addresses of the TCP sockets in LISTEN state (0A) that the processes `pids` hold (none
    where /proc/net has no TCP tables: the tests that read them are skipped there)."""
    if not HAS_PROC_NET:
        return []
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
    """127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address ([::ffff:7f00:1], how Ray's servers bind)."""
    ip = ipaddress.ip_address(addr.rsplit(":", 1)[0].strip("[]"))
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


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
