"""Test files run in a pytest process of their own, as a background job beside the main session.

The precompute farm's tests (test_precompute_job.py) spend two minutes driving a Ray head with
`ray job submit`, at about one core, and the sequence-parallel parity tests (test_parallel_sp.py)
most of a minute; the 2-rank tests at the end of the session leave part of the second core idle
once the other background jobs (tests/runs.py Background) have ended. So the main session does
not run the slow tests of those files itself: it hands them, by node id, to one
`python -m pytest` process (`VGPT_TEST_OFFLOADED` set there: it runs them as usual, with its
own fixtures, Ray head and moto server) queued in the background lane, and puts in their place
items of the same node ids, at the end of the session, that wait for that process and report
each test's outcome from its JUnit XML (a failure with the child's traceback). Every test and
every assertion runs as before; only the process differs. Their durations are printed at the
end of the session (`durations_line`), as --durations would have named them.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.runs import BACKGROUND, REPO

# the slow tests of these files: self-contained (no session fixture shared with other files), long
OFFLOADED_FILES = ("test_precompute_job.py", "test_parallel_sp.py")
CHILD = "VGPT_TEST_OFFLOADED"  # set in the pytest process that runs the offloaded tests itself
JOB = "offloaded_tests"


def offloadable(items) -> list:
    """The items the main session hands to a process of their own: none in that process itself,
    and none when they are all the session runs (nothing to run beside)."""
    if os.environ.get(CHILD):
        return []
    picked = [i for i in items if Path(str(i.fspath)).name in OFFLOADED_FILES and i.get_closest_marker("slow")]
    return picked if len(picked) < len(items) else []


def run_child(node_ids: list[str], folder: Path, run) -> dict[str, dict]:
    """Run `node_ids` in one pytest process (through `run`, the background lane's runner);
    returns {node id: {"outcome", "message", "seconds"}} from its JUnit XML."""
    xml = folder / "junit.xml"
    # a short base: a Ray head's unix socket paths, under its temp dir, have a length limit
    base = Path(tempfile.mkdtemp(prefix="vgpt-offloaded-"))
    proc = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={base}",
                f"--junitxml={xml}", *node_ids], env={**os.environ, CHILD: "1"}, cwd=REPO, timeout=1800)
    if proc.returncode == 0:
        shutil.rmtree(base, ignore_errors=True)  # kept where a test failed, for a look
    if not xml.is_file():
        raise RuntimeError(f"offloaded tests: pytest exited {proc.returncode} without a report:\n"
                           f"{(proc.stdout + proc.stderr)[-4000:]}")
    results = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/") + ".py"
        node_id = f"{module}::{case.get('name')}"
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome = kind
                message = (found.text or found.get("message") or "").strip()
                break
        results[node_id] = {"outcome": outcome, "message": message, "seconds": float(case.get("time", 0))}
    return results


class OffloadedItem(pytest.Item):
    """A test run by the offloaded process: waits for it, then passes, fails or skips as it did there."""

    def runtest(self) -> None:
        results = BACKGROUND.result(JOB)
        got = results.get(self.nodeid)
        if got is None:
            pytest.fail(f"{self.nodeid}: the offloaded pytest process did not report this test", pytrace=False)
        self.user_properties.append(("offloaded_seconds", got["seconds"]))
        if got["outcome"] == "skipped":
            pytest.skip(got["message"])
        if got["outcome"] != "passed":
            pytest.fail(f"{got['outcome']} in the offloaded pytest process:\n{got['message']}", pytrace=False)

    def reportinfo(self):
        return self.path, None, f"{self.name} (offloaded)"


def offload(items, picked, factory) -> list:
    """Queue the tests `picked` (offloadable(items)) in the background lane and return the session's
    items with each of them replaced by an OffloadedItem of the same node id, those last."""
    if not picked:
        return items
    folder = factory.mktemp("offloaded")
    node_ids = [i.nodeid for i in picked]
    BACKGROUND.add(JOB, lambda: run_child(node_ids, folder, run=BACKGROUND.run))
    stand_ins = []
    for i in picked:
        item = OffloadedItem.from_parent(i.parent, name=i.name)
        item.own_markers.extend(i.iter_markers())  # `slow`, as the test it stands in for
        stand_ins.append(item)
    kept = [i for i in items if i not in picked]
    return kept + stand_ins


def durations_line() -> str | None:
    """The offloaded tests' durations, slowest first (for the end of the session), or None."""
    if not BACKGROUND.finished(JOB):  # not queued, or the session ended before it did
        return None
    try:
        results = BACKGROUND.result(JOB)
    except Exception:  # noqa: BLE001 - its tests already failed with the reason
        return None
    ranked = sorted(results.items(), key=lambda kv: -kv[1]["seconds"])
    return "run in a pytest process of their own (tests/offload.py): " + ", ".join(
        f"{r['seconds']:.1f}s {k}" for k, r in ranked)
