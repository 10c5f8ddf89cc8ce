"""Harness for the precompute farm's end-to-end tests: a Ray head on loopback
(and a second Ray node joining it), `ray job submit` through the real CLI, real
mp4 inputs, and dataset readers.

Each node runs as `ray start --block` in its own process group with its own
temp dir, and teardown ends that group: other Ray instances on the machine
(other engineers', other test sessions) are left alone, which `ray stop` would
not do. Killing a worker node's group is how the multi-node test loses a node.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from data.shard_format import committed_manifests, iter_tar
from data.synthetic.videos import pattern_frames, write_bad_inputs, write_video
from orchestration.local_ray import SHARED_HOST_WORKER_PORTS

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/precompute/tiny.yaml"

# name, width, height, frames, fps, codec: all valid under configs/precompute/tiny.yaml
GOOD = [("clip_a", 256, 144, 20, 24, "mpeg4"), ("clip-b", 160, 128, 12, 10, "h264"),
        ("clip c", 224, 128, 16, 30, "mpeg4"), ("clip_d", 192, 144, 9, 15, "h264")]
# name -> regex the errors/ record's reason must match
BAD = {"empty.mp4": "empty file", "text.mp4": "not a readable video container",
       "truncated.mp4": "not a readable video container|decode error", "short.mp4": "too few frames: 2 sampled",
       "small.mp4": "too small: 120x96", "wide.mp4": r"aspect ratio 5\.00:1"}


def make_inputs(folder: Path) -> dict[str, Path]:
    """Real videos (different sizes, fps, lengths, codecs) plus every bad input of acceptance 4."""
    folder.mkdir(parents=True, exist_ok=True)
    good = {}
    for i, (name, w, h, t, fps, codec) in enumerate(GOOD):
        good[name] = write_video(folder / f"{name}.mp4", pattern_frames(w, h, t, seed=i), fps, codec)
    write_video(folder / "short.mp4", pattern_frames(160, 128, 2, seed=7), 24)
    write_video(folder / "small.mp4", pattern_frames(120, 96, 10, seed=8), 24)
    write_video(folder / "wide.mp4", pattern_frames(640, 128, 8, seed=9), 24)
    write_bad_inputs(folder, good["clip_a"])
    (folder / "notes.txt").write_text("not an input: wrong extension")
    return good


RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
# Every submitted job cuts videos longer than 16 frames into segments: clip_a (20 frames) gives two samples.
SEGMENTS = ("--precompute.video.max_frames=16",)
HEAD_RESOURCE, NODE_B_RESOURCE = "vgpt_head", "vgpt_node_b"


class RayHead:
    def __init__(self, tmp: Path, node_ip: str = "127.0.0.1"):
        from conftest import free_port

        self.port, self.dash = free_port(), free_port()
        self.temp_dir = tmp / "ray"  # short path: Ray's unix socket paths have a length limit
        self.log = open(tmp / "ray-head.log", "w")
        # Ray maps 127.0.0.1 to the routable interface unless told this is a one-box "cluster":
        # this keeps the GCS, raylet and workers on loopback.
        # Token auth off for this throwaway loopback head, explicitly, so that a token file
        # in ~/.ray (which turns it on) does not change what the test does.
        # Health checks every second instead of 3 s: a killed node (test 6) is declared dead after 5 refused
        # checks, ~5 s instead of ~15; the 10 s timeout per check keeps a slow but live node alive.
        env = {**os.environ, **RAY_ENV, "RAY_health_check_period_ms": "1000"}
        self.proc = subprocess.Popen(
            ["ray", "start", "--head", "--block", "--node-ip-address", node_ip, "--dashboard-host", "127.0.0.1",
             "--port", str(self.port), "--dashboard-port", str(self.dash), "--num-cpus", "2",
             "--object-store-memory", str(200 * 1024 * 1024), "--disable-usage-stats",
             "--temp-dir", str(self.temp_dir), "--include-dashboard", "true",
             "--resources", json.dumps({HEAD_RESOURCE: 1}),
             # Free ports, not Ray's fixed defaults: another Ray on this machine holds those, and a head
             # whose agent cannot bind its HTTP port never accepts a job.
             "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
             *SHARED_HOST_WORKER_PORTS],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.address, self.node_ip = f"http://127.0.0.1:{self.dash}", node_ip
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, attempts: int = 240) -> None:
        # Poll the job server until it answers (bounded); the head takes ~6-20 s on a busy box.
        for _ in range(attempts):
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray head exited with {self.proc.returncode}: see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.address}/api/version", timeout=2):
                    return
            except urllib.error.HTTPError:  # answered (401 under Ray's token auth): it is up
                return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"ray head at {self.address} did not come up: see {self.log.name}")

    def stop(self) -> None:
        """SIGKILL the head's process group: this head and its workers only. A graceful
        `ray start --block` shutdown takes ~30 s here, and the temp dir is thrown away anyway."""
        kill_group(self.proc, self.log)

    def submit(self, *overrides: str, env: dict | None = None, timeout: int = 300,
               runtime_env: dict | None = None) -> tuple[int, str]:
        """`ray job submit ... -- vgpt precompute --config tiny.yaml <overrides>`; (exit code, output).
        runtime_env: more entries of the job's runtime env (tests/refusing_node.py)."""
        runtime_env = {"env_vars": {"VGPT_CACHE": os.environ["VGPT_CACHE"], **(env or {})}, **(runtime_env or {})}
        cmd = ["ray", "job", "submit", "--address", self.address, "--working-dir", str(REPO),
               "--runtime-env-json", json.dumps(runtime_env), "--",
               "vgpt", "precompute", "--config", TINY, *SEGMENTS, *overrides]
        # The dashboard answers before the node's job agent has registered; on a loaded machine that
        # gap is seconds, and Ray then refuses the submission and asks to try again: do, a bounded number of times.
        for _ in range(120):
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                 env={**os.environ, **RAY_ENV, "RAY_ADDRESS": self.address})
            if out.returncode == 0 or "No available agent to submit job" not in out.stdout + out.stderr:
                break
            time.sleep(1.0)
        return out.returncode, out.stdout + out.stderr


def kill_group(proc: subprocess.Popen, log) -> None:
    """SIGKILL a `ray start` process group (its raylet, object store and workers) and close its log."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    log.close()


class RayNode:
    """A second Ray node on loopback joining `head`, with its own custom resource; `kill` loses it
    (SIGKILL to its raylet, object store and workers), as a machine failure would."""

    def __init__(self, tmp: Path, head: RayHead, resource: str = NODE_B_RESOURCE, num_cpus: int = 2,
                 refuse_jobs: bool = False):
        """refuse_jobs: the node fails to set up every job whose runtime env names tests/refusing_node.py."""
        from conftest import free_port

        self.log = open(tmp / f"ray-{resource}.log", "w")
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the head's loopback switch) also forbids joining a head, and
        # with it on, Ray rewrites the address 127.0.0.1 to the routable one: so a head that other nodes
        # join listens on 127.0.0.2 (loopback too, but not rewritten), see `RayHead(node_ip=...)`.
        assert head.node_ip != "127.0.0.1", "start the head with node_ip='127.0.0.2' to let nodes join it"
        env = {**os.environ, **RAY_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
        # A temp dir of its own, as a node on its own machine has: a node started without one shares the
        # head's session dir, and with it the unpacked working dir of the job, which a node's runtime-env
        # agent deletes and unpacks again the first time it sets the job up (Ray's working_dir plugin,
        # overwrite=True), under the running driver, whose cwd it is: the job then dies at random.
        # (Short: Ray's unix socket paths have a length limit.)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="r", dir=tmp))
        if refuse_jobs:
            env["RAY_RUNTIME_ENV_PLUGINS"] = json.dumps([{"class": "refusing_node.RefuseJobs"}])
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            ["ray", "start", "--block", "--address", f"{head.node_ip}:{head.port}", "--node-ip-address", head.node_ip,
             "--num-cpus", str(num_cpus), "--resources", json.dumps({resource: 1}),
             "--object-store-memory", str(200 * 1024 * 1024), "--disable-usage-stats",
             "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
             "--temp-dir", str(self.temp_dir), *SHARED_HOST_WORKER_PORTS],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            self._wait_joined(head, resource)
        except BaseException:
            self.kill()
            raise

    def _wait_joined(self, head: RayHead, resource: str, attempts: int = 240) -> None:
        for _ in range(attempts):  # bounded poll of the head's node table
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray node exited with {self.proc.returncode}: see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{head.address}/api/v0/nodes?detail=1", timeout=5) as r:
                    nodes = json.loads(r.read())["data"]["result"]["result"]
                if any(n.get("state") == "ALIVE" and resource in n.get("resources_total", {}) for n in nodes):
                    return
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"ray node with {resource} did not join: see {self.log.name}")

    def kill(self) -> None:
        kill_group(self.proc, self.log)


def read_dataset(fs, root: str) -> dict[str, dict[str, bytes]]:
    """key -> tar members, over the committed shards; checks every manifest against its tar."""
    out = {}
    for stem, m in committed_manifests(fs, root).items():
        tar = fs.cat_file(f"{root}/shards/{stem}.tar")
        assert hashlib.sha256(tar).hexdigest() == m.sha256 and len(tar) == m.bytes, f"{stem}: tar != manifest"
        samples = dict(iter_tar(tar, where=stem))
        assert list(samples) == m.keys, f"{stem}: tar keys {list(samples)} != manifest keys {m.keys}"
        for key, members in samples.items():
            assert key not in out, f"key {key} in two shards"
            out[key] = members
    return out


def read_errors(fs, root: str) -> dict[str, dict]:
    fs.invalidate_cache(f"{root}/errors")
    return {json.loads(fs.cat_file(p))["key"]: json.loads(fs.cat_file(p)) for p in fs.glob(f"{root}/errors/*.json")}
