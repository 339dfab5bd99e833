"""The built wheel installs into a fresh virtual environment and its `onellm` command runs."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def wheel_path(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: build with this environment's setuptools (offline-safe).
    proc = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(out.glob("onellm-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_uses_the_onellm_namespace_only(wheel_path: Path) -> None:
    names = zipfile.ZipFile(wheel_path).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"onellm"}, f"wheel squats top-level names: {sorted(top)}"
    for required in (
        "onellm/cli.py",
        "onellm/runtime/errors.py",
        "onellm/runtime/modalities/imu.py",
        "onellm/ref/config.py",
        "onellm/ref/presets/7b.json",
        "onellm/ref/presets/tiny.json",
        "onellm/export/__init__.py",
    ):
        assert required in names, f"{required} missing from the wheel"
    assert not any(n.startswith("onellm/tests/") for n in names)


@pytest.mark.slow
def test_wheel_installs_and_cli_runs_in_fresh_venv(wheel_path: Path, tmp_path: Path, tiny_bundle: Path) -> None:
    """The core install alone (no torch, no export extra) answers from a bundle built earlier."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # The core dependencies come from pip's cache (or the registry) like a user's install.
    proc = _run([str(py), "-m", "pip", "install", "--quiet", str(wheel_path)], timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    exe = env_dir / "bin" / "onellm"
    help_out = _run([str(exe), "--help"], cwd=tmp_path, env=clean_env)
    assert help_out.returncode == 0, help_out.stderr
    assert "Usage: onellm" in help_out.stdout
    # The installed package is the wheel's, not this checkout, and torch is not needed.
    where = _run(
        [str(py), "-c", "import onellm.cli, sys; print(onellm.cli.__file__); print('torch' in sys.modules)"],
        cwd=tmp_path,
        env=clean_env,
    )
    assert where.returncode == 0, where.stderr
    path_line, torch_line = where.stdout.split()
    assert str(env_dir) in path_line
    assert torch_line == "False"
    presets = _run([str(exe), "presets"], cwd=tmp_path, env=clean_env)
    assert presets.returncode == 0, presets.stderr
    assert "7b" in presets.stdout and "tiny" in presets.stdout
    no_torch = _run([str(py), "-c", "import importlib.util; print(importlib.util.find_spec('torch') is None)"],
                    cwd=tmp_path, env=clean_env)
    assert no_torch.stdout.strip() == "True", "the core install pulled in torch"
    ask = _run([str(exe), "ask", "--bundle", str(tiny_bundle), "--imu", str(REPO / "examples" / "imu" / "walk.csv"),
                "--greedy", "--max-tokens", "8", "What is the person doing?"], cwd=tmp_path, env=clean_env, timeout=300)
    assert ask.returncode == 0, ask.stderr[-3000:]
    assert ask.stdout.strip() and "RANDOM weights" in ask.stderr
