"""`onellm batch`: job validation, resumable results, error records, and equality with single asks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from onellm.cli import main
from onellm.runtime import batch
from onellm.runtime.batch import ResultsFile, jobs_from_dir, read_jobs, read_results, run_batch
from onellm.runtime.decoder import Sampling
from onellm.runtime.errors import InputError
from onellm.runtime.pipeline import read_input

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
IMU = EXAMPLES / "imu" / "walk.csv"
FMRI = EXAMPLES / "fmri" / "betas.npy"
GREEDY = Sampling.greedy(max_new_tokens=6)


def _run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _write_jobs(folder: Path, n_imu: int = 4) -> Path:
    """A jobs file in `folder` with relative input paths: n_imu IMU questions, one fMRI chat, one bad input."""
    shutil.copy(IMU, folder / "walk.csv")
    shutil.copy(FMRI, folder / "betas.npy")
    (folder / "broken.csv").write_text("time_s,acc_x\n0,1\n")
    lines = [{"id": f"imu-{i}", "imu": "walk.csv", "question": f"What is happening, take {i}?"} for i in range(n_imu)]
    lines.insert(2, {"id": "bad", "imu": "broken.csv", "question": "What?"})
    lines.append({"id": "brain", "fmri": "betas.npy", "questions": ["What was seen?", "Where?"]})
    lines.append({"id": "late", "imu": "walk.csv", "question": "Later?", "options": {"start": 1.0}})
    path = folder / "jobs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _essence(rec: dict) -> dict:
    """A record without its timings (what must repeat exactly)."""
    out = {k: v for k, v in rec.items() if k != "seconds"}
    if "input" in out:
        out["input"] = {k: v for k, v in out["input"].items() if k != "preprocess_s"}
    return out


def _by_id(records: list[dict]) -> dict[str, dict]:
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), f"duplicated ids: {ids}"
    return {r["id"]: _essence(r) for r in records}


def _batch(engine, jobs, out: Path, sampling=GREEDY):
    with ResultsFile(out) as results:
        return run_batch(engine, jobs, results, sampling=sampling)


@pytest.fixture(scope="module")
def batch_engine(tiny_bundle):
    """The engine `onellm batch` runs on, with its default two decode slots."""
    from onellm.runtime.engine import Engine

    with Engine.load(tiny_bundle, parallel=2) as engine:
        yield engine


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("lines, number, expect", [
    (['{"id": "a", "question": "Q"}', '{"id": "b", "question": '], 2, "invalid JSON"),
    (['{"id": "a", "question": "Q"}', "", '{"question": "Q"}'], 3, '"id"'),
    (['{"id": "a", "question": "Q"}', '{"id": "a", "question": "R"}'], 2, "first on line 1"),
    (['{"id": 1, "imu": "x.csv"}'], 1, '"question" or "questions"'),
    (['{"id": 1, "question": "Q", "colour": "red"}'], 1, "colour"),
    (['{"id": 1, "question": "Q", "sampling": {"temperature": "hot"}}'], 1, "temperature"),
    (['{"id": 1, "questions": []}'], 1, "non-empty"),
    (['[1, 2]'], 1, "a JSON object"),
])
def test_bad_jobs_file_names_the_line(tmp_path, lines, number, expect):
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as err:
        read_jobs(path)
    msg = str(err.value)
    assert f"jobs.jsonl:{number}:" in msg and expect in msg and "\n" not in msg


def test_bad_jobs_file_fails_before_the_bundle_loads(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"id": "a", "question": "Q"}\n{"id": "a", "question": "Q"}\n')
    res = _run("batch", str(path), "--out", str(tmp_path / "r.jsonl"), "--bundle", str(tmp_path / "no-bundle"))
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "jobs.jsonl:2:" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "r.jsonl").exists() or (tmp_path / "r.jsonl").read_bytes() == b""


def test_relative_paths_resolve_against_the_jobs_folder(tmp_path):
    jobs = read_jobs(_write_jobs(tmp_path))
    assert jobs[0].inputs == {"imu": str(tmp_path.resolve() / "walk.csv")}
    assert [j.line for j in jobs] == list(range(1, len(jobs) + 1))
    assert jobs[-2].questions == ("What was seen?", "Where?") and jobs[-2].multi
    assert jobs[-1].options == {"start": 1.0}


# ----------------------------------------------------------------------------- answers


def test_results_equal_single_asks_and_bad_inputs_are_records(batch_engine, tiny_pipeline, tmp_path):
    jobs = read_jobs(_write_jobs(tmp_path))
    state = _batch(batch_engine, jobs, tmp_path / "r.jsonl")
    assert (state.done, state.failed, state.skipped) == (len(jobs) - 1, 1, 0)
    got = _by_id(read_results(tmp_path / "r.jsonl"))
    assert list(got) == [j.id for j in jobs]  # in job order
    with pytest.raises(InputError) as err:
        read_input("imu", str(tmp_path / "broken.csv"))
    assert got["bad"] == {"id": "bad", "error": str(err.value)}
    for job in jobs:
        if job.id == "bad":
            continue
        if job.multi:
            chat = tiny_pipeline.chat(options=job.options, **job.inputs)
            want = [chat.ask(q, sampling=GREEDY) for q in job.questions]
            assert [a["answer"] for a in got[job.id]["answers"]] == [a.text for a in want]
            assert [a["token_ids"] for a in got[job.id]["answers"]] == [a.token_ids for a in want]
        else:
            want = tiny_pipeline.ask(job.questions[0], options=job.options, sampling=GREEDY, **job.inputs)
            assert got[job.id]["answer"] == want.text and got[job.id]["token_ids"] == want.token_ids
            assert got[job.id]["stop_reason"] == want.stop_reason and got[job.id]["input"]["n_samples"] > 0
    # the window option reached the reader
    assert got["late"]["input"]["window_s"] == [1.0, 3.0]
    assert len(got["imu-0"]["token_ids"]) > 0


def test_seeded_sampling_repeats_exactly(batch_engine, tmp_path):
    jobs = read_jobs(_write_jobs(tmp_path))
    hot = Sampling(temperature=1.5, top_p=1.0, seed=7, max_new_tokens=8)
    _batch(batch_engine, jobs, tmp_path / "a.jsonl", sampling=hot)
    _batch(batch_engine, jobs, tmp_path / "b.jsonl", sampling=hot)
    a, b = _by_id(read_results(tmp_path / "a.jsonl")), _by_id(read_results(tmp_path / "b.jsonl"))
    assert a == b
    _batch(batch_engine, jobs, tmp_path / "g.jsonl")
    greedy = _by_id(read_results(tmp_path / "g.jsonl"))
    assert any(a[k].get("token_ids") != greedy[k].get("token_ids") for k in a)  # the sampling did something


def test_job_sampling_overrides_the_run_default(batch_engine, tmp_path):
    shutil.copy(FMRI, tmp_path / "betas.npy")
    (tmp_path / "jobs.jsonl").write_text(
        '{"id": "short", "fmri": "betas.npy", "question": "Q?", "sampling": {"max_tokens": 2}}\n'
        '{"id": "long", "fmri": "betas.npy", "question": "Q?"}\n')
    _batch(batch_engine, read_jobs(tmp_path / "jobs.jsonl"), tmp_path / "r.jsonl",
           sampling=Sampling(temperature=0.0, top_p=1.0, max_new_tokens=5, seed=3))
    got = _by_id(read_results(tmp_path / "r.jsonl"))
    assert len(got["short"]["token_ids"]) <= 2 and got["long"]["token_ids"][:2] == got["short"]["token_ids"]


# ----------------------------------------------------------------------------- resuming


def test_interrupt_in_the_middle_then_resume_loses_and_duplicates_nothing(batch_engine, tmp_path, monkeypatch):
    jobs = read_jobs(_write_jobs(tmp_path))
    _batch(batch_engine, jobs, tmp_path / "clean.jsonl")
    clean = _by_id(read_results(tmp_path / "clean.jsonl"))

    real = batch.Runner._answer
    calls = []

    def interrupted(self, prep):
        calls.append(prep.job.id)
        if len(calls) == 3:  # the third answered job: Ctrl-C while it decodes
            raise KeyboardInterrupt
        return real(self, prep)

    monkeypatch.setattr(batch.Runner, "_answer", interrupted)
    out = tmp_path / "r.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _batch(batch_engine, jobs, out)
    first = read_results(out)
    assert [r["id"] for r in first] == ["imu-0", "imu-1", "bad"]  # two answers + the error record, then the kill
    before = out.read_bytes()
    monkeypatch.setattr(batch.Runner, "_answer", real)
    state = _batch(batch_engine, jobs, out)
    assert (state.skipped, state.done + state.failed) == (3, len(jobs) - 3)
    assert out.read_bytes().startswith(before)  # appended, never rewritten
    assert _by_id(read_results(out)) == clean


def test_reader_failure_stops_the_run_and_keeps_what_was_written(batch_engine, tmp_path, monkeypatch):
    jobs = read_jobs(_write_jobs(tmp_path))
    real = batch.Runner._prepare

    def broken(self, job):
        if job.id == "imu-3":
            raise RuntimeError("reader crashed")
        return real(self, job)

    monkeypatch.setattr(batch.Runner, "_prepare", broken)
    with pytest.raises(RuntimeError, match="reader crashed"):
        _batch(batch_engine, jobs, tmp_path / "r.jsonl")
    assert [r["id"] for r in read_results(tmp_path / "r.jsonl")] == ["imu-0", "imu-1", "bad", "imu-2"]


def test_torn_last_line_is_stepped_over_not_cut(batch_engine, tmp_path):
    jobs = read_jobs(_write_jobs(tmp_path))
    out = tmp_path / "r.jsonl"
    _batch(batch_engine, jobs[:2], out)
    full = _by_id(read_results(out))
    with open(out, "ab") as fh:
        fh.write(b'{"id":"bad","error":"half a reco')  # a kill -9 in the middle of a write
    torn = out.read_bytes()
    results = ResultsFile(out)
    assert results.done == {"imu-0", "imu-1"} and results.torn_lines == 1
    results.close()
    assert out.read_bytes() == torn + b"\n"  # the torn line is kept; the next record starts on its own line
    state = _batch(batch_engine, jobs, out)
    assert (state.skipped, state.done + state.failed) == (2, len(jobs) - 2)
    data = out.read_bytes()
    assert data.startswith(torn + b"\n")
    got = _by_id(read_results(out))
    assert set(got) == {j.id for j in jobs} and got["imu-0"] == full["imu-0"]
    assert "broken.csv" in got["bad"]["error"]


KILLER = textwrap.dedent("""
    import sys, threading
    from onellm.runtime import batch
    real = batch.Runner._answer
    calls = []
    def slow_after(self, prep):
        calls.append(prep.job.id)
        if len(calls) > {k}:
            threading.Event().wait()  # stuck in the decode of job {k}+1 until the test kills us
        return real(self, prep)
    batch.Runner._answer = slow_after
    from onellm.cli import main
    sys.argv = ["onellm"] + sys.argv[1:]
    main()
""")


def test_kill_9_loses_only_the_job_in_flight(tiny_bundle, tmp_path):
    jobs_file = _write_jobs(tmp_path)
    n_jobs = len(read_jobs(jobs_file))
    out = tmp_path / "r.jsonl"
    k = 3  # answered jobs before the stall (plus the error record among them)
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(k=k))
    args = ["batch", str(jobs_file), "--out", str(out), "--bundle", str(tiny_bundle), "--greedy", "--max-tokens", "6"]
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and len(read_results(out)) >= k + 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    first = [r["id"] for r in read_results(out)]
    assert first == ["imu-0", "imu-1", "bad", "imu-2"]
    res = _run(*args, "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["skipped"] == 4 and summary["done"] + summary["failed"] == n_jobs - 4
    clean = tmp_path / "clean.jsonl"
    assert _run(*[a if a != str(out) else str(clean) for a in args]).exit_code == 0
    assert _by_id(read_results(out)) == _by_id(read_results(clean))
    again = _run(*args, "--json")
    assert json.loads(again.output.strip().splitlines()[-1])["skipped"] == n_jobs  # nothing left to do


# ----------------------------------------------------------------------------- --inputs DIR


def test_inputs_folder_form(tiny_bundle, tmp_path):
    clips = tmp_path / "clips"
    (clips / "sub").mkdir(parents=True)
    shutil.copy(IMU, clips / "b.csv")
    shutil.copy(IMU, clips / "sub" / "a.CSV")
    (clips / "notes.md").write_text("not an IMU file")
    jobs = jobs_from_dir(clips, "imu", "What?")
    assert [j.id for j in jobs] == ["b.csv", "sub/a.CSV"]
    out = tmp_path / "r.jsonl"
    res = _run("batch", "--inputs", str(clips), "--modality", "imu", "--question", "What is the person doing?",
               "--out", str(out), "--bundle", str(tiny_bundle), "--greedy", "--max-tokens", "5", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert (summary["done"], summary["failed"], summary["skipped"]) == (2, 0, 0) and summary["jobs_per_s"] > 0
    recs = read_results(out)
    assert [r["id"] for r in recs] == ["b.csv", "sub/a.CSV"]
    assert recs[0]["token_ids"] == recs[1]["token_ids"]  # the same recording, the same greedy answer
    assert recs[0]["question"] == "What is the person doing?"


@pytest.mark.parametrize("args, expect", [
    (["--inputs", "DIR", "--question", "Q"], "--modality"),
    (["--inputs", "DIR", "--modality", "imu"], "--question"),
    (["--inputs", "DIR", "--modality", "depth", "--question", "Q"], "jobs file"),
    (["--inputs", "DIR/none", "--modality", "imu", "--question", "Q"], "no such folder"),
    ([], "JOBS_FILE"),
])
def test_inputs_folder_errors_are_one_line(tmp_path, args, expect):
    args = [a.replace("DIR", str(tmp_path)) for a in args]
    res = _run("batch", *args, "--out", str(tmp_path / "r.jsonl"))
    assert res.exit_code == 2 and expect in res.output and res.output.strip().count("\n") == 0


def test_identical_files_keep_their_own_paths(batch_engine, tmp_path):
    # the engine's block cache is keyed by content: the second file is a cache hit, its record still names it
    for name in ("a.csv", "b.csv"):
        shutil.copy(IMU, tmp_path / name)
    (tmp_path / "jobs.jsonl").write_text('{"id": "a", "imu": "a.csv", "question": "Q?"}\n'
                                         '{"id": "b", "imu": "b.csv", "question": "Q?"}\n')
    _batch(batch_engine, read_jobs(tmp_path / "jobs.jsonl"), tmp_path / "r.jsonl")
    got = _by_id(read_results(tmp_path / "r.jsonl"))
    assert got["a"]["input"]["source"] == str(tmp_path.resolve() / "a.csv")
    assert got["b"]["input"]["source"] == str(tmp_path.resolve() / "b.csv")
    assert got["a"]["token_ids"] == got["b"]["token_ids"]


def test_kv_cache_option_reaches_the_engine(tiny_bundle, tmp_path, monkeypatch):
    """--kv-cache q8_0 (half the cache memory) is what the batch's engine loads with; with --ray
    it is refused up front rather than dropped."""
    from onellm.runtime.engine import Engine

    seen = []
    real = Engine.load.__func__

    def spy(cls, *a, **kw):
        engine = real(cls, *a, **kw)
        seen.append(dict(engine.context))
        return engine

    monkeypatch.setattr(Engine, "load", classmethod(spy))
    clips = tmp_path / "clips"
    clips.mkdir()
    shutil.copy(IMU, clips / "a.csv")
    out = tmp_path / "r.jsonl"
    common = ["--inputs", str(clips), "--modality", "imu", "--question", "What?", "--bundle", str(tiny_bundle),
              "--greedy", "--max-tokens", "4"]
    res = _run("batch", *common, "--out", str(out), "--kv-cache", "q8_0", "--json")
    assert res.exit_code == 0, res.output
    assert seen and seen[-1]["kv_type"] == "q8_0" and seen[-1]["flash_attn"] is True
    assert [r["id"] for r in read_results(out)] == ["a.csv"] and "answer" in read_results(out)[0]
    refused = _run("batch", *common, "--out", str(tmp_path / "r2.jsonl"), "--ray", "--kv-cache", "q8_0")
    assert refused.exit_code == 2 and "--kv-cache" in refused.output
    assert not (tmp_path / "r2.jsonl").exists()
