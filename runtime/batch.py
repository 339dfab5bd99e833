"""`onellm batch`: answer many jobs from a JSONL file into a resumable JSONL results file.

    jobs = read_jobs("jobs.jsonl")                      # validates every line before anything loads
    with Pipeline.load("bundle/") as pipe, ResultsFile("results.jsonl") as out:
        summary = run_batch(pipe, jobs, out)

A job line is one JSON object:
    {"id": "walk-1", "imu": "walk.csv", "question": "What is the person doing?",
     "options": {"start": 1.0}, "sampling": {"temperature": 0, "max_tokens": 32}}
Inputs are keyed by modality as in `Pipeline.ask` (`imu`, `audio`, `depth` + `image`, ...);
relative paths resolve against the jobs file's folder. "questions" (a list) asks several
questions in one chat about the same input.

Results: one JSON object per line, appended, flushed and fsynced as each job ends, so a
killed run loses at most the job in flight. A rerun skips every id already in the file.
A torn last line (a kill in the middle of a write) is ignored and the next record starts
on a new line after it; the file is never truncated or rewritten. A job whose input is bad
becomes an error record {"id", "error"} and the run goes on.

Pipelining: a worker thread reads, preprocesses and encodes the next jobs while the main
thread decodes the current one (the pipeline's lock serialises the encoder and decoder;
the readers, usually the slow part, run alongside the decode). `Runner._answer` is the
one place that decodes, so a request engine with several decode slots can replace it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, InputError
from .modalities import get_modality, input_names

log = logging.getLogger(__name__)

SAMPLING_KEYS = {  # job "sampling" key -> (Sampling field, accepted types)
    "temperature": ("temperature", (int, float)),
    "top_p": ("top_p", (int, float)),
    "top_k": ("top_k", (int,)),
    "repeat_penalty": ("repeat_penalty", (int, float)),
    "max_tokens": ("max_new_tokens", (int,)),
    "seed": ("seed", (int,)),
}
JOB_KEYS = {"id", "question", "questions", "options", "sampling"}
PREFETCH = 2  # jobs read and encoded ahead of the one decoding


@dataclasses.dataclass(frozen=True)
class Job:
    """One validated job line."""

    id: str  # unique within the jobs file
    inputs: dict[str, str]  # job key (imu, depth, image, ...) -> absolute path
    questions: tuple[str, ...]  # asked in one chat, in order
    multi: bool  # the line said "questions" (the record then has "answers")
    options: dict[str, Any]  # reader options
    sampling: dict[str, Any]  # Sampling field -> value, over the run's defaults
    line: int  # 1-based line number in the jobs file (0: made from --inputs)


# ----------------------------------------------------------------------------- jobs


def read_jobs(path: str | os.PathLike) -> list[Job]:
    """Parse and validate every line of a jobs file; raises InputError naming the first bad line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, "a readable UTF-8 JSONL jobs file", f"{type(exc).__name__}: {exc}") from None
    base = path.resolve().parent
    jobs: list[Job] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InputError(where, "one JSON object per line", f"invalid JSON ({exc.msg} at column {exc.colno})") from None
        job = parse_job(obj, base, where, number)
        if job.id in seen:
            raise InputError(where, "a unique id", f"id {job.id!r} again (first on line {seen[job.id]})")
        seen[job.id] = number
        jobs.append(job)
    if not jobs:
        raise InputError(path, "at least one job line", "none")
    return jobs


def parse_job(obj: Any, base: Path, where: str, line: int = 0) -> Job:
    """One job object -> `Job` (paths resolved against `base`); raises InputError naming `where`."""
    if not isinstance(obj, dict):
        raise InputError(where, "a JSON object", type(obj).__name__)
    job_id = obj.get("id")
    if isinstance(job_id, bool) or not isinstance(job_id, (str, int)) or job_id == "":
        raise InputError(where, 'an "id" (string or integer)', "none" if job_id is None else repr(job_id))
    job_id = str(job_id)
    input_keys = set(input_names())  # modality names and their option words (depth, normal)
    unknown = sorted(k for k in obj if k not in JOB_KEYS and k not in input_keys)
    if unknown:
        raise InputError(where, f"keys among {', '.join(sorted(JOB_KEYS | input_keys))}", f"{', '.join(unknown)}")
    inputs: dict[str, str] = {}
    for key in sorted(input_keys & set(obj)):
        value = obj[key]
        if not isinstance(value, str) or not value:
            raise InputError(where, f'a file path for "{key}"', repr(value))
        inputs[key] = str((base / value) if not Path(value).is_absolute() else Path(value))
    if "question" in obj and "questions" in obj:
        raise InputError(where, '"question" or "questions"', "both")
    multi = "questions" in obj
    questions = obj["questions"] if multi else [obj.get("question")]
    if questions == [None]:
        raise InputError(where, 'a "question" or "questions"', "neither")
    if not isinstance(questions, list) or not questions or not all(isinstance(q, str) and q.strip() for q in questions):
        raise InputError(where, "non-empty question strings" + (" in a non-empty list" if multi else ""),
                         repr(obj["questions"] if multi else obj.get("question")))
    options = obj.get("options", {})
    if not isinstance(options, dict):
        raise InputError(where, '"options" as an object of reader options', type(options).__name__)
    raw_sampling = obj.get("sampling", {})
    if not isinstance(raw_sampling, dict):
        raise InputError(where, '"sampling" as an object', type(raw_sampling).__name__)
    sampling: dict[str, Any] = {}
    for key, value in raw_sampling.items():
        if key not in SAMPLING_KEYS:
            raise InputError(where, f"sampling keys among {', '.join(SAMPLING_KEYS)}", repr(key))
        field, types = SAMPLING_KEYS[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise InputError(where, f"a number for sampling {key!r}", repr(value))
        sampling[field] = value
    return Job(id=job_id, inputs=inputs, questions=tuple(questions), multi=multi, options=dict(options),
               sampling=sampling, line=line)


def jobs_from_dir(folder: str | os.PathLike, modality: str, question: str,
                  options: dict[str, Any] | None = None) -> list[Job]:
    """One job per file of `modality`'s types under `folder` (recursive, sorted); id = relative path."""
    spec = get_modality(input_names().get(modality, modality))
    if spec.requires_image:
        raise ConfigError(f"--modality {modality}: needs an RGB photo per map; write a jobs file for it instead of --inputs")
    root = Path(folder)
    if not root.is_dir():
        raise InputError(root, "a folder of input files (--inputs)", "no such folder")
    if not question or not question.strip():
        raise InputError("--question", "a question to ask about every file", "none")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in spec.file_types)
    if not files:
        raise InputError(root, f"{spec.name} files ({' '.join(spec.file_types)})", "none")
    return [Job(id=p.relative_to(root).as_posix(), inputs={spec.name: str(p.resolve())}, questions=(question,),
                multi=False, options=dict(options or {}), sampling={}, line=0) for p in files]


# ----------------------------------------------------------------------------- results


class ResultsFile:
    """An append-only JSONL results file: which ids are done, and durable appends."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.done: set[str] = set()  # ids with a record (answer or error)
        self.torn_lines = 0  # unparseable lines seen (each ignored)
        needs_newline = False
        if self.path.exists():
            if not self.path.is_file():
                raise InputError(self.path, "a results file (--out)", "a folder")
            data = self.path.read_bytes()
            needs_newline = bool(data) and not data.endswith(b"\n")
            for number, raw in enumerate(data.split(b"\n"), start=1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                    self.done.add(str(rec["id"]))
                except (ValueError, TypeError, KeyError):
                    self.torn_lines += 1
                    log.warning("%s:%d: ignoring a torn or invalid line (its job, if any, runs again)",
                                self.path, number)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "ab")  # noqa: SIM115 (closed by close())
        if needs_newline:
            self._fh.write(b"\n")  # start after the torn line, never cutting it away
            self._sync()

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line, durably (flush + fsync) before returning."""
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
        self._fh.write(line)
        self._sync()
        self.done.add(str(record["id"]))

    def _sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every parseable record of a results file, in order (torn lines skipped)."""
    out = []
    for raw in Path(path).read_bytes().split(b"\n"):
        if raw.strip():
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
    return out


# ----------------------------------------------------------------------------- running


@dataclasses.dataclass
class Progress:
    """Counts of a run so far (given to the progress callback after each job)."""

    total: int  # jobs to run this time (skipped ones excluded)
    skipped: int  # jobs already in the results file
    done: int = 0  # answered this run
    failed: int = 0  # error records written this run
    seconds: float = 0.0  # since the run started

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def jobs_per_s(self) -> float:
        return self.finished / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.jobs_per_s
        return (self.total - self.finished) / rate if rate > 0 else None

    def summary(self) -> dict[str, Any]:
        return {"done": self.done, "failed": self.failed, "skipped": self.skipped,
                "seconds": round(self.seconds, 3), "jobs_per_s": round(self.jobs_per_s, 3)}


@dataclasses.dataclass
class _Prepared:
    """A job read and encoded, ready to decode (or the one-line error that stopped it)."""

    job: Job
    modality: str | None = None
    block: np.ndarray | None = None  # a copy of the encoder's [32, n_embd] rows
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0  # reading + encoding
    error: str | None = None


_END = object()


class Runner:
    """Runs jobs through a `Pipeline` into a `ResultsFile`, reading ahead on a worker thread."""

    def __init__(self, pipe, results: ResultsFile, *, sampling=None, prefetch: int = PREFETCH) -> None:
        from .decoder import Sampling

        self.pipe = pipe
        self.results = results
        self.sampling = sampling or Sampling()
        self.prefetch = max(1, prefetch)

    # The two stages. Both turn a bad input (InputError/ConfigError) into an error record.
    def _prepare(self, job: Job) -> _Prepared:
        """Read + encode one job's input (worker thread)."""
        t0 = time.perf_counter()
        try:
            modality, source, image = self.pipe.pick_input(dict(job.inputs))
            block, meta = None, {}
            if modality is not None:
                view, meta = self.pipe.encode(modality, source, image=image, options=job.options)
                block = np.array(view, copy=True)  # the view is overwritten by the next encode
            return _Prepared(job, modality, block, meta, time.perf_counter() - t0)
        except (InputError, ConfigError) as exc:
            return _Prepared(job, error=str(exc), seconds=time.perf_counter() - t0)

    def _answer(self, prep: _Prepared) -> dict[str, Any]:
        """Decode one prepared job into its result record (main thread)."""
        job = prep.job
        sampling = dataclasses.replace(self.sampling, **job.sampling)
        t0 = time.perf_counter()
        chat = self.pipe.chat(embeddings=prep.block, modality=prep.modality) if prep.block is not None else None
        turns = []
        for question in job.questions:
            if chat is not None:
                ans = chat.ask(question, sampling=sampling)
            else:
                ans = self.pipe.ask(question, sampling=sampling)
            turns.append({"question": question, "answer": ans.text, "token_ids": ans.token_ids,
                          "stop_reason": ans.stop_reason})
        record: dict[str, Any] = {"id": job.id}
        if job.multi:
            record["answers"] = turns
        else:
            record.update(turns[0])
        record["modality"] = prep.modality
        record["input"] = prep.meta
        record["seconds"] = {"read_encode": round(prep.seconds, 4), "decode": round(time.perf_counter() - t0, 4)}
        return record

    def run(self, jobs: Iterable[Job], progress: Callable[[Progress], None] | None = None) -> Progress:
        """Run every job whose id has no record yet; returns the final counts."""
        jobs = list(jobs)
        todo = [j for j in jobs if j.id not in self.results.done]
        state = Progress(total=len(todo), skipped=len(jobs) - len(todo))
        t0 = time.perf_counter()
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def feed() -> None:
            try:
                for job in todo:
                    if stop.is_set():
                        return
                    item = self._prepare(job)
                    while not stop.is_set():
                        try:
                            ready.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
            except BaseException as exc:  # surfaced on the main thread
                ready.put(exc)
            finally:
                ready.put(_END)

        worker = threading.Thread(target=feed, name="onellm-batch-reader", daemon=True)
        worker.start()
        try:
            while True:
                item = ready.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:
                    self.results.append({"id": item.job.id, "error": item.error})
                    state.failed += 1
                    log.info("job %s failed: %s", item.job.id, item.error)
                else:
                    self.results.append(self._answer(item))
                    state.done += 1
                state.seconds = time.perf_counter() - t0
                if progress is not None:
                    progress(state)
        finally:
            stop.set()
            deadline = time.monotonic() + 30.0
            while worker.is_alive() and time.monotonic() < deadline:  # let the reader see `stop`
                try:
                    ready.get(timeout=0.1)
                except queue.Empty:
                    pass
        state.seconds = time.perf_counter() - t0
        return state


def run_batch(pipe, jobs: Iterable[Job], results: ResultsFile, *, sampling=None,
              progress: Callable[[Progress], None] | None = None) -> Progress:
    """Answer `jobs` with `pipe` into `results` (see the module docstring); returns the counts."""
    return Runner(pipe, results, sampling=sampling).run(jobs, progress)
