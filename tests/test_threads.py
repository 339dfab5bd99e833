"""Thread settings on a shared CPU: llama.cpp's thread governor, the OpenMP wait policy, onnxruntime's options.

Why they matter (benchmarks/busy_cpu.py, runtime/_llama.py): llama-cpp-python's CPU
backend waits at OpenMP barriers, and libgomp spins there for ~3 ms. On a CPU shared
with another busy process that made prefill 100x slower. The runtime runs no more
llama.cpp threads than there are free cores (`ThreadGovernor`) and can set the wait
policy before libgomp loads; libgomp itself is asked (through its omp_display_env) what
it ended up with, in a fresh interpreter each time.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from onellm.benchmarks import busy_cpu
from onellm.runtime import _llama

# Runs in a fresh interpreter: import the runtime's llama.cpp layer, then ask the libgomp
# that llama.cpp loaded for its settings (omp_display_env prints them to stderr).
_PROBE = r"""
import ctypes, json, os, sys
import onellm.runtime._llama as L
maps = open("/proc/self/maps").read()
gomp = [line.split()[-1] for line in maps.splitlines() if line.rstrip().endswith("/libgomp.so.1")
        or "/libgomp.so.1." in line]
print(json.dumps({"policy": L.wait_policy, "env": os.environ.get("OMP_WAIT_POLICY"),
                  "gomp": sorted(set(gomp))}), flush=True)
if gomp:
    lib = ctypes.CDLL(gomp[0])
    if hasattr(lib, "omp_display_env"):
        lib.omp_display_env(1)
"""


def _probe(**env_overrides: str | None) -> tuple[dict, dict[str, str]]:
    """(what the probe printed, libgomp's displayed settings) in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", _llama.WAIT_POLICY_ENV, _llama.ADAPTIVE_ENV)}
    for k, v in env_overrides.items():
        if v is not None:
            env[k] = v
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    shown = {}
    for line in proc.stderr.splitlines():  # lines like "  GOMP_SPINCOUNT = '0'"
        key, sep, value = line.strip().partition(" = ")
        if sep:
            shown[key] = value.strip("'")
    return info, shown


def _need_gomp(info: dict, shown: dict) -> None:
    if not info["gomp"]:
        pytest.skip("this llama-cpp-python build does not use OpenMP (libgomp): no OpenMP wait policy to check")
    if "GOMP_SPINCOUNT" not in shown:
        pytest.skip("this libgomp has no omp_display_env to report its settings")


def test_libgomp_keeps_its_spin_policy_by_default():
    """An idle machine runs as before: the runtime does not change libgomp's waiting."""
    info, shown = _probe()
    assert info["policy"] == "native"
    assert info["env"] is None
    _need_gomp(info, shown)
    assert int(shown["GOMP_SPINCOUNT"]) > 1000  # libgomp's own default (300000 spins, ~3 ms)


def test_passive_policy_is_in_place_before_llama_cpp_loads_libgomp():
    info, shown = _probe(ONELLM_WAIT_POLICY="passive")
    assert info["policy"] == "passive"
    assert info["env"] == "PASSIVE"
    _need_gomp(info, shown)
    # libgomp read the variable when llama.cpp loaded it: no spinning at barriers at all
    assert shown["OMP_WAIT_POLICY"] == "PASSIVE"
    assert shown["GOMP_SPINCOUNT"] == "0"


def test_users_openmp_settings_win():
    info, shown = _probe(OMP_WAIT_POLICY="ACTIVE", ONELLM_WAIT_POLICY="passive")
    assert info["policy"] == "user"
    assert info["env"] == "ACTIVE"
    _need_gomp(info, shown)
    assert shown["OMP_WAIT_POLICY"] == "ACTIVE"
    assert int(shown["GOMP_SPINCOUNT"]) > 300000


@pytest.mark.parametrize(
    ("given", "expected_policy", "expected_env"),
    [
        ({}, "native", {}),
        ({"ONELLM_WAIT_POLICY": "Passive "}, "passive", {"ONELLM_WAIT_POLICY": "Passive ", "OMP_WAIT_POLICY": "PASSIVE"}),
        ({"ONELLM_WAIT_POLICY": "native"}, "native", {"ONELLM_WAIT_POLICY": "native"}),
        ({"GOMP_SPINCOUNT": "1000", "ONELLM_WAIT_POLICY": "passive"}, "user",
         {"GOMP_SPINCOUNT": "1000", "ONELLM_WAIT_POLICY": "passive"}),
        ({"OMP_WAIT_POLICY": "active"}, "user", {"OMP_WAIT_POLICY": "active"}),
        ({"OMP_WAIT_POLICY": "", "ONELLM_WAIT_POLICY": "passive"}, "passive",
         {"OMP_WAIT_POLICY": "PASSIVE", "ONELLM_WAIT_POLICY": "passive"}),
    ],
)
def test_apply_wait_policy(given, expected_policy, expected_env):
    env = dict(given)
    assert _llama.apply_wait_policy(env) == expected_policy
    assert env == expected_env


def test_unknown_wait_policy_is_logged_and_native(caplog):
    env = {"ONELLM_WAIT_POLICY": "spinny"}
    with caplog.at_level(logging.WARNING, logger=_llama.log.name):
        assert _llama.apply_wait_policy(env) == "native"
    assert "OMP_WAIT_POLICY" not in env
    assert "ONELLM_WAIT_POLICY='spinny'" in caplog.text and "passive" in caplog.text


# ---------------------------------------------------------------- the thread governor


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_governor_uses_the_free_cores_and_rechecks_after_its_interval():
    seen = iter([0, 1, 5, None, 0])
    calls = []

    def others():
        calls.append(1)
        return next(seen)

    clock = _Clock()
    gov = _llama.ThreadGovernor(4, cores=4, interval=1.0, others=others, clock=clock)
    assert gov.threads() == 4  # idle: every thread
    clock.t = 0.5
    assert gov.threads() == 4 and len(calls) == 1  # within the interval: no new look
    clock.t = 1.0
    assert gov.threads() == 3  # one other busy core takes one of ours
    clock.t = 2.5
    assert gov.threads() == 1  # more busy cores than ours: one thread, never zero
    clock.t = 4.0
    assert gov.threads() == 4  # /proc unreadable: the configured count
    clock.t = 5.0
    assert gov.threads() == 4 and len(calls) == 5


def test_other_cpu_load_counts_sustained_use_and_rounds_away_blips():
    """Busy CPU time of the machine minus our own, per second of window, in whole cores."""
    t, busy, own = [0.0], [100.0], [5.0]
    load = _llama.OtherCpuLoad(busy=lambda: busy[0], own=lambda: own[0], clock=lambda: t[0])
    t[0], busy[0], own[0] = 1.0, 102.0, 6.0  # 2 s busy in 1 s of window, 1 s of it ours: one other core
    assert load() == 1
    t[0], busy[0], own[0] = 2.0, 103.3, 7.0  # 0.3 s of others': a short burst, not a core
    assert load() == 0
    t[0], busy[0], own[0] = 2.5, 104.3, 7.5  # both cores busy, half of it ours: one other core
    assert load() == 1
    busy[0] = None  # /proc/stat unreadable
    t[0] = 3.0
    assert load() is None


def test_other_cpu_load_reads_this_machine():
    assert _llama._cpu_busy_seconds() is not None
    load = _llama.OtherCpuLoad(min_window=0.0)
    time.sleep(0.05)
    k = load()
    assert k is not None and 0 <= k <= (os.cpu_count() or 64)


def test_governor_never_exceeds_its_maximum():
    gov = _llama.ThreadGovernor(2, cores=16, others=lambda: 3)
    assert gov.threads() == 2


def test_other_running_threads_subtracts_our_own(monkeypatch):
    reads = iter([7, 5])
    monkeypatch.setattr(_llama, "_proc_stat_running", lambda path="/proc/stat": next(reads))
    monkeypatch.setattr(_llama, "_own_running_threads", lambda task_dir="/proc/self/task": 2)
    assert _llama.other_running_threads() == 3  # min(7, 5) - 2: a blip in one read is not counted
    monkeypatch.setattr(_llama, "_proc_stat_running", lambda path="/proc/stat": None)
    assert _llama.other_running_threads() is None


def test_proc_readers_parse_real_files(tmp_path):
    stat = tmp_path / "stat"
    stat.write_bytes(b"cpu  1 2 3 4\nctxt 99\nprocs_running 6\nprocs_blocked 0\n")
    assert _llama._proc_stat_running(str(stat)) == 6
    assert _llama._proc_stat_running(str(tmp_path / "missing")) is None
    tasks = tmp_path / "task"
    for tid, state in (("10", "R"), ("11", "S"), ("12", "R")):
        (tasks / tid).mkdir(parents=True)
        (tasks / tid / "stat").write_bytes(f"{tid} (a (weird) name) {state} 1 2 3".encode())
    assert _llama._own_running_threads(str(tasks)) == 2
    # on this machine the caller itself is running
    assert _llama._own_running_threads() >= 1
    assert _llama._proc_stat_running() >= 1


@pytest.mark.parametrize(("value", "on"), [(None, True), ("", True), ("1", True), ("0", False), ("off", False),
                                           ("False", False)])
def test_adaptive_threads_switch(value, on):
    env = {} if value is None else {"ONELLM_ADAPTIVE_THREADS": value}
    assert _llama.adaptive_threads_enabled(env) is on


def test_context_follows_the_governor_and_explicit_threads_stay_fixed(tiny_gguf, monkeypatch):
    """Each llama_decode runs with the governor's thread count (llama_set_n_threads called on change only)."""
    calls = []
    real = _llama.lib().llama_set_n_threads
    monkeypatch.setattr(_llama.lib(), "llama_set_n_threads", lambda ctx, n, nb: (calls.append((n, nb)), real(ctx, n, nb)))
    monkeypatch.delenv("ONELLM_ADAPTIVE_THREADS", raising=False)
    with _llama.LlamaModel(tiny_gguf("f32"), n_gpu_layers=0) as model:
        with _llama.LlamaContext(model, n_ctx=64, n_threads=None) as ctx, _llama.LlamaBatch(8) as batch:
            assert ctx.governor is not None
            answers = iter([1, 1, 2])
            ctx.governor.threads = lambda: next(answers)
            ctx.decode(batch.tokens([1, 5, 6], 0))
            ctx.decode(batch.tokens([7], 3))
            ctx.decode(batch.tokens([8], 4))
            assert calls == [(1, 1), (2, 2)]
            assert _llama.lib().llama_n_threads(ctx.ptr) == 2
        with _llama.LlamaContext(model, n_ctx=64, n_threads=2) as ctx, _llama.LlamaBatch(8) as batch:
            assert ctx.governor is None  # --threads N: exactly N
            ctx.decode(batch.tokens([1, 5], 0))
        monkeypatch.setenv("ONELLM_ADAPTIVE_THREADS", "0")
        with _llama.LlamaContext(model, n_ctx=64) as ctx:
            assert ctx.governor is None
    assert len(calls) == 2


@pytest.mark.parametrize(("cpus", "threads"), [(1, 1), (2, 2), (3, 3), (4, 4), (6, 3), (8, 4), (16, 8)])
def test_default_thread_count_rule(monkeypatch, cpus, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert _llama.default_threads() == threads


# ---------------------------------------------------------------- onnxruntime sessions


@pytest.fixture()
def identity_graph(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "g.onnx")
    spec = [{"name": "x", "shape": [1, 4], "dtype": "float32"}]
    graph_entry = {"file": "g.onnx", "sha256": "", "bytes": 0, "inputs": spec,
                   "outputs": [{"name": "y", "shape": [1, 4], "dtype": "float32"}], "used_by": [], "fused_ops": {},
                   "precision": "fp32", "quantization": None, "parity": None, "export_seconds": 0.0}
    return {"precision": "fp32", "n_embd": 4, "n_inserted": 2, "width": 4, "opset": 17, "optimized": False,
            "batched_experts": False, "graphs": {"g": graph_entry}, "modalities": {}}, tmp_path


@pytest.mark.parametrize(("spin", "threads"), [(False, 3), (True, 2)])
def test_onnxruntime_session_threads_and_spinning(identity_graph, spin, threads):
    from onellm.runtime.encoder import Encoder

    entries, bundle = identity_graph
    enc = Encoder(entries, bundle, device="cpu", threads=threads, spin=spin, verify=False)
    opts = enc.session("g").get_session_options()
    assert opts.intra_op_num_threads == threads
    assert opts.inter_op_num_threads == 1
    # idle intra-op workers sleep unless asked to spin (the decoder runs right after, on the same cores)
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spin else "0")
    enc.close()


def test_onnxruntime_session_default_threads_are_physical_cores(identity_graph):
    from onellm.runtime.encoder import Encoder, physical_cores

    entries, bundle = identity_graph
    enc = Encoder(entries, bundle, device="cpu", verify=False)
    assert enc.session("g").get_session_options().intra_op_num_threads == physical_cores()
    enc.close()


# ---------------------------------------------------------------- the benchmark's bookkeeping


def test_busy_benchmark_child_env_selects_only_the_setting():
    base = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "5", "ONELLM_ADAPTIVE_THREADS": "1", "PATH": "/bin"}
    assert busy_cpu.child_env("old", base) == {"PATH": "/bin", "ONELLM_WAIT_POLICY": "native",
                                               "ONELLM_ADAPTIVE_THREADS": "0"}
    assert busy_cpu.child_env("new", base) == {"PATH": "/bin"}
    assert busy_cpu.child_env("passive", base) == {"PATH": "/bin", "ONELLM_WAIT_POLICY": "passive",
                                                   "ONELLM_ADAPTIVE_THREADS": "0"}
    with pytest.raises(ValueError, match="policy must be one of"):
        busy_cpu.child_env("fast", {})


def test_busy_benchmark_medians_and_ratios():
    def run(policy, comp, ttft, decode, enc=0.1, pre=0.2):
        return {"bundle": "demo", "policy": policy, "competitors": comp, "ttft_s": ttft, "preprocess_s": 1.0,
                "encode_s": enc, "prefill_s": pre, "lib_ttft_s": enc + pre, "decode_tok_s": decode,
                "wall_s": ttft + 1, "cpu_s": 1.0}

    runs = [run("old", 0, 1.0, 100), run("old", 0, 3.0, 300), run("old", 0, 2.0, 200),
            run("old", 1, 8.0, 20, pre=1.4), run("new", 0, 2.1, 190), run("new", 1, 3.0, 150)]
    cells = {(c["policy"], c["competitors"]): c for c in busy_cpu.summarise(runs)}
    assert cells[("old", 0)]["ttft_s"] == 2.0 and cells[("old", 0)]["decode_tok_s"] == 200
    assert cells[("old", 0)]["runs"] == 3
    rows = {r["policy"]: r for r in busy_cpu.ratios(list(cells.values()))}
    assert rows["old"]["ttft_busy_over_idle"] == pytest.approx(4.0)
    assert rows["old"]["lib_ttft_busy_over_idle"] == pytest.approx(5.0)
    assert rows["old"]["decode_idle_over_busy"] == pytest.approx(10.0)
    assert rows["new"]["ttft_busy_over_idle"] == pytest.approx(3.0 / 2.1)
    assert rows["new"]["idle_ttft_vs_old"] == pytest.approx(1.05)
    assert rows["new"]["idle_decode_vs_old"] == pytest.approx(0.95)
    md = busy_cpu.markdown({"load_before": [0.1], "load_after": [0.2], "reps": 3, "max_tokens": 64, "threads": None,
                            "cells": list(cells.values()), "ratios": list(rows.values())})
    assert "| demo | new | 1 | 2.100 | 3.000 | 1.43 |" in md


def test_busy_benchmark_rejects_bad_options(capsys):
    with pytest.raises(SystemExit):
        busy_cpu.main(["--policies", "old,fast"])
    assert "--policies" in capsys.readouterr().err


def test_busy_benchmark_reuses_a_built_mid_bundle(tmp_path, monkeypatch):
    monkeypatch.setenv("ONELLM_CACHE_DIR", str(tmp_path))
    built = tmp_path / "busy-cpu-mid" / "bundle"
    built.mkdir(parents=True)
    (built / "manifest.json").write_text("{}")
    messages = []
    assert busy_cpu.mid_bundle(messages.append) == built
    assert messages == []  # nothing rebuilt
