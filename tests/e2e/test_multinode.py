"""pdserve over several Ray nodes: tests/e2e/multinode_check.py, in a process of its own (a
3-node Ray cluster on this machine, apart from the shared e2e cluster)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_prefill_and_decode_on_different_nodes_with_a_node_killed(e2e_model):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    # Serve's Python proxy: three Ray nodes on one host would start three HAProxy processes
    # binding the same stats and metrics ports (on real nodes each has its own).
    env["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.e2e.multinode_check", "--model", e2e_model,
         "--port", str(free_port())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)  # a hang guard
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MULTINODE ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(lines[-1].removeprefix("MULTINODE "))
    print("\n" + lines[-1])
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert out["placement"] == {"decode_on_head": True, "ingress_on_head": True,
                                "prefill_on_workers": True}
    assert out["equal_hf"] == [True, True]
    # each stream either finished with the clean run's text or ended with an error event
    assert set(out["streams"]) <= {"ok", "error"}, out
    assert len(out["errors"]) == out["streams"].count("error")
    assert out["after_kill_equal_hf"] == [True, True, True]
    assert out["decode_pages_used"] == 0
