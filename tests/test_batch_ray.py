"""The Ray batch tests (tests/ray_cases.py), run in a pytest process of their own.

Ray keeps threads alive after `ray.shutdown()` (Ray Data's metrics poller, tqdm's monitor
thread); in the main test session they ran beside later tests that parse Python source
(torch.onnx export through onnxscript) and one such run failed with CPython 3.11's
"AST constructor recursion depth mismatch". A separate process keeps them apart.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def test_ray_cases_pass_in_their_own_process(tiny_bundle):
    pytest.importorskip("ray")
    env = {**os.environ, "ONELLM_RAY_CASES_BUNDLE": str(tiny_bundle)}  # built once, in this session
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
         str(HERE / "ray_cases.py")],
        capture_output=True, text=True, timeout=1200, cwd=HERE.parent, env=env,
    )
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert "5 passed" in proc.stdout, tail
