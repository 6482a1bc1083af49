"""Run a planner worker module in a fresh Python process: the CUDA autocast rules a traced
run installs are process-wide, so each trace gets a process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_worker_module(module: str, payload, timeout: float, what: str):
    """``python -m module`` with ``payload`` as JSON on stdin (this checkout first on
    PYTHONPATH, one math thread): its JSON answer on stdout, or RuntimeError naming
    ``what`` failed with the last line of its stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", module], input=json.dumps(payload),
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.strip().splitlines()[-1:]) or f"exit code {proc.returncode}"
        raise RuntimeError(f"{what} failed: {tail}")
    return json.loads(proc.stdout)
