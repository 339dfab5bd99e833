"""The built wheel installs into a fresh virtual environment and its `onellm` command runs.

Both steps run offline: the wheel is built from a copy of the source outside the tree
with no package index, and the fresh venv resolves the core requirements against the
distributions installed here (no index, no download).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _source_copy(dest: Path) -> Path:
    """The checkout's files (tracked, and new ones git does not ignore) copied to `dest`,
    so the build writes its build/ and egg-info there, not into the source tree."""
    proc = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    for rel in filter(None, proc.stdout.split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _core_requirements() -> set[str]:
    """Distributions the core install needs (onellm's requirements without extras, recursively)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    need, todo = set(), list(metadata.requires("onellm") or [])
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name in need:
            continue
        need.add(name)
        todo.extend(metadata.requires(req.name) or [])
    return need


def _offline_site(dest: Path) -> Path:
    """A folder exposing exactly the installed core dependencies (links to this environment's
    copies), so a fresh venv resolves them with no package index."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    dest.mkdir()
    need = _core_requirements()
    for dist in metadata.distributions():
        if canonicalize_name(dist.metadata["Name"]) not in need or not dist.files:
            continue
        for f in dist.files:
            top = f.parts[0]
            if top == ".." or top.endswith(".pth") or (dest / top).exists():
                continue
            target = Path(dist.locate_file(top))
            if target.exists():
                (dest / top).symlink_to(target)
    assert not (dest / "torch").exists()
    return dest


@pytest.fixture(scope="module")
def wheel_path(tmp_path_factory) -> Path:
    src = _source_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("wheel")
    # offline: no index, no build isolation (this environment's setuptools builds it)
    proc = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation", "-w", str(out),
         str(src)], cwd=src,
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
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # Offline: the core dependencies are the ones installed here, exposed through a .pth
    # folder; pip resolves the wheel's requirements against them with no package index.
    (Path(site) / "onellm_test_deps.pth").write_text(str(_offline_site(tmp_path / "deps")) + "\n")
    proc = _run([str(py), "-m", "pip", "install", "--quiet", "--no-index", str(wheel_path)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    check = _run([str(py), "-m", "pip", "check"])
    assert check.returncode == 0, check.stdout + check.stderr
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
