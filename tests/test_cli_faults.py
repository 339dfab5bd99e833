"""Every CLI command under faults: one line on stderr, a non-zero exit, never a traceback.

OS faults are injected (monkeypatched os calls raising OSError with the errno), since
the tests run as root, where a chmod'ed read-only directory is still writable. Checks
that must come before the bundle loads are run with `Pipeline.load` replaced by a
recorder, so a check that comes late fails the test.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from onellm.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
IMU = str(EXAMPLES / "imu" / "walk.csv")
PHOTO = str(EXAMPLES / "image" / "photo.jpg")


def _run(*args: str, input=None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def _one_line_error(res, *words: str, code: int | None = None) -> str:
    """The result failed with exactly one `onellm: error:` line holding every word; returns it."""
    assert res.exit_code != 0, res.output
    if code is not None:
        assert res.exit_code == code, res.output
    assert "Traceback" not in res.output and "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("onellm: error:")]
    assert len(errors) == 1, res.stderr
    assert "internal error" not in errors[0], errors[0]
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


@pytest.fixture
def no_load(monkeypatch):
    """Pipeline.load replaced by a recorder: a test asserts it was never reached."""
    from onellm.runtime.errors import BundleError
    from onellm.runtime.pipeline import Pipeline

    calls = []

    def fake(cls, *a, **k):
        calls.append((a, k))
        raise BundleError("(test) the bundle was loaded")

    monkeypatch.setattr(Pipeline, "load", classmethod(fake))
    return calls


# ------------------------------------------------------------------ validate before loading


@pytest.mark.parametrize("args, words", [
    (["ask", "--imu", "/nonexistent/walk.csv", "Q?"], ["/nonexistent/walk.csv", "no such file"]),
    (["ask", "--imu", IMU, "--max-tokens", "-5", "Q?"], ["--max-tokens", ">= 1", "-5"]),
    (["ask", "--imu", IMU, "--top-p", "5", "Q?"], ["--top-p", "(0, 1]", "5.0"]),
    (["ask", "--imu", IMU, "--top-p", "0", "Q?"], ["--top-p", "(0, 1]"]),
    (["ask", "--imu", IMU, "--threads", "0", "Q?"], ["--threads", ">= 1"]),
    (["ask", "--imu", IMU, "--temperature", "-1", "Q?"], ["--temperature", ">= 0"]),
    (["ask", "--imu", IMU, "--temperature", "nan", "Q?"], ["--temperature", ">= 0", "nan"]),
    (["ask", "--imu", IMU, "--top-k", "-1", "Q?"], ["--top-k", ">= 0"]),
    (["ask", "--imu", IMU, "--ctx", "0", "Q?"], ["--ctx", ">= 1"]),
    (["ask", "--imu", IMU, "   "], ["QUESTION", "non-empty question"]),
    (["ask", "--imu", IMU, "--image", PHOTO, "Q?"], ["--imu does not take an --image"]),
    (["ask", "--imu", IMU, "--audio", str(EXAMPLES / "audio" / "speech.wav"), "Q?"], ["one modality input"]),
    (["ask", "--embeddings", "e.npz", "--imu", IMU, "Q?"], ["--embeddings", "found --imu"]),
    (["ask", "--imu", IMU, "--audio-start", "3", "Q?"], ["--audio-start", "an --audio input", "--imu"]),
    (["ask", "--image", PHOTO, "--imu-rate", "50", "Q?"], ["--imu-rate", "the input is --image"]),
    (["ask", "--depth", str(EXAMPLES / "depth" / "depth.png"), "Q?"], ["--depth", "no --image"]),
    (["ask", "--imu", IMU, "--reader-option", "speed=2", "Q?"], ["--reader-option", "imu reader", "rate", "speed"]),
    (["ask", "--imu", IMU, "--reader-option", "oops", "Q?"], ["--reader-option", "KEY=VALUE"]),
    (["ask", "--modality", "imu", "Q?"], ["--modality", "--embeddings"]),
    (["ask"], ["QUESTION"]),
    (["chat", "--imu", "-"], ["standard input carries the chat's questions"]),
    (["chat", "--imu", IMU, "--top-p", "2"], ["--top-p"]),
    (["encode", "--out", "x.npz"], ["one input file to encode"]),
    (["encode", "--imu", IMU, "--out", "/nonexistent/dir/x.npz"], ["/nonexistent/dir/x.npz", "no directory"]),
    (["encode", "--imu", "/nonexistent/walk.csv", "--out", "x.npz"], ["walk.csv", "no such file"]),
])
def test_bad_options_fail_before_the_bundle_loads(no_load, tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    res = _run(*args[:1], "--bundle", str(tmp_path / "bundle"), *args[1:])
    _one_line_error(res, *words)
    assert no_load == [], "the bundle was loaded before the input was checked"


def test_bad_stdin_fails_before_the_bundle_loads(no_load, tmp_path):
    res = _run("ask", "--bundle", str(tmp_path), "--imu", "-", "Q?", input=b"")
    _one_line_error(res, "<stdin>", "no data")
    res = _run("ask", "--bundle", str(tmp_path), "--imu", "-", "Q?", input=(EXAMPLES / "image" / "photo.jpg").read_bytes())
    _one_line_error(res, "<stdin>", "a JPEG image")
    assert no_load == []


def test_good_options_do_reach_the_bundle(no_load, tmp_path):
    """The recorder itself works: valid options get as far as loading, with --ctx passed on."""
    res = _run("ask", "--bundle", str(tmp_path), "--imu", IMU, "--ctx", "256", "--threads", "1", "Q?")
    _one_line_error(res, "(test) the bundle was loaded")
    assert len(no_load) == 1 and no_load[0][1]["n_ctx"] == 256 and no_load[0][1]["threads"] == 1


# ------------------------------------------------------------------ OS faults on writers


def _inject_os(monkeypatch, code: int, under: Path, only: str = ""):
    """os.open / os.mkdir raise `code` for paths under `under` (containing `only`)."""
    real_open, real_mkdir = os.open, os.mkdir

    def check(path):
        p = os.fspath(path)
        if p.startswith(str(under)) and only in p:
            raise OSError(code, os.strerror(code), p)

    def fake_open(path, *a, **k):
        check(path)
        return real_open(path, *a, **k)

    def fake_mkdir(path, *a, **k):
        check(path)
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


WRITERS = {
    "encode": lambda out: ["encode", "--bundle", "{bundle}", "--imu", IMU, "--out", str(out / "emb.npz")],
    "export": lambda out: ["export", "--demo", "--out", str(out / "bundle")],
    "bench": lambda out: ["bench", "--out", str(out / "bench")],
    "reference make-tiny": lambda out: ["reference", "make-tiny", "--out", str(out / "tiny")],
}
FAULTS = {
    errno.EACCES: "permission denied (EACCES)",
    errno.EROFS: "read-only file system (EROFS)",
    errno.ENOSPC: "no space left on device (disk full) (ENOSPC)",
    errno.ENOENT: "no such file or directory (ENOENT)",
}


@pytest.mark.parametrize("code", list(FAULTS), ids=[errno.errorcode[c] for c in FAULTS])
@pytest.mark.parametrize("command", list(WRITERS))
def test_writers_report_os_faults_in_one_line(no_load, tmp_path, monkeypatch, command, code):
    out = tmp_path / "out"
    out.mkdir()
    args = [a.replace("{bundle}", str(tmp_path / "b")) for a in WRITERS[command](out)]
    _inject_os(monkeypatch, code, out)
    line = _one_line_error(_run(*args), str(out), FAULTS[code])
    assert no_load == []
    print(f"FAULT {command} {errno.errorcode[code]}: {line}")


@pytest.mark.parametrize("command", list(WRITERS))
def test_writers_report_a_file_in_the_way(no_load, tmp_path, command):
    blocker = tmp_path / "out"
    blocker.write_text("a file where a directory should be")
    args = [a.replace("{bundle}", str(tmp_path / "b")) for a in WRITERS[command](blocker)]
    line = _one_line_error(_run(*args), str(blocker), "in the way")
    print(f"FAULT {command} ENOTDIR: {line}")
    if command != "encode":  # --out itself is a file
        line = _one_line_error(_run(*args[:-1], str(blocker)), str(blocker), "found a file in the way")
        print(f"FAULT {command} EEXIST: {line}")
    assert no_load == []


def test_encode_disk_full_while_writing(tiny_bundle, tmp_path, monkeypatch):
    """A fault after the checks passed (the block's own write) is one line too, and leaves no partial file."""
    out = tmp_path / "emb.npy"
    _inject_os(monkeypatch, errno.ENOSPC, tmp_path, only=".partial")
    line = _one_line_error(_run("encode", "--bundle", str(tiny_bundle), "--imu", IMU, "--out", str(out)),
                           str(out), "cannot write", "ENOSPC")
    print(f"FAULT encode ENOSPC-while-writing: {line}")
    assert list(tmp_path.iterdir()) == []


def test_bench_reports_fault_while_writing(tmp_path, monkeypatch):
    """bench's reports failing to write after the run: one line naming the file."""
    import onellm.benchmarks.bench as bench
    import onellm.benchmarks.report as report

    monkeypatch.setattr(bench, "run_bench", lambda opts, progress=None: {"schema": "x"})

    def full(result, out_dir, stem="bench"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(out_dir) / "bench.json"))

    monkeypatch.setattr(report, "write_reports", full)
    line = _one_line_error(_run("bench", "--out", str(tmp_path / "b")), "bench.json", "cannot write the bench reports",
                           "ENOSPC")
    print(f"FAULT bench ENOSPC-while-writing: {line}")


# ------------------------------------------------------------------ missing extras


@pytest.mark.parametrize("args", [
    ["bench", "--out", "{tmp}/b"],
    ["verify", "{tmp}"],
    ["export", "--demo", "--out", "{tmp}/b"],
    ["reference", "params"],
    ["reference", "make-tiny", "--out", "{tmp}/t"],
    ["reference", "ask", "--checkpoint", "c.pth", "--tokenizer", "t.model", "Q?"],
])
def test_commands_needing_torch_say_which_extra(tmp_path, monkeypatch, args):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    line = _one_line_error(_run(*[a.replace("{tmp}", str(tmp_path)) for a in args]),
                           "pip install 'onellm[export]'")
    print(f"FAULT {' '.join(args[:2])} no-torch: {line}")


def test_missing_optional_module_names_its_extra(monkeypatch, tmp_path):
    import onellm.cli as cli

    def needs_matplotlib(*a, **k):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr("onellm.benchmarks.bench.run_bench", needs_matplotlib)
    _one_line_error(_run("bench", "--out", str(tmp_path / "b")), "pip install 'onellm[bench]'")
    assert cli._EXTRAS["gguf"] == "export"


def test_unexpected_error_is_one_line_and_internal(monkeypatch, tmp_path):
    def boom(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("onellm.benchmarks.bench.run_bench", boom)
    res = _run("bench", "--out", str(tmp_path / "b"))
    assert res.exit_code == 70 and "Traceback" not in res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("onellm: error:")]
    assert errors == ["onellm: error: internal error (ZeroDivisionError: division by zero); rerun with -vv for the "
                      "traceback and report it"]


# ------------------------------------------------------------------ manifests


@pytest.mark.parametrize("key", ["decoder.default", "encoder.precisions", "tokenizer", "prompt.stop"])
def test_manifest_missing_key_is_a_bundle_error_naming_it(tiny_bundle, tmp_path, key):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    *parents, last = key.split(".")
    table = manifest
    for p in parents:
        table = table[p]
    del table[last]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    res = _run("ask", "--bundle", str(bundle), "--imu", IMU, "--greedy", "--max-tokens", "2", "Q?")
    line = _one_line_error(res, "manifest.json", f"expected the key '{key}'", code=1)
    print(f"FAULT ask manifest-missing-{key}: {line}")
