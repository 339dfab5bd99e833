"""`onellm batch`: answer many jobs from a JSONL file into a resumable JSONL results file.

    jobs = read_jobs("jobs.jsonl")                      # validates every line before anything loads
    with Engine.load("bundle/", parallel=2) as engine, ResultsFile("results.jsonl") as out:
        summary = run_batch(engine, jobs, out)

A job line is one JSON object:
    {"id": "walk-1", "imu": "walk.csv", "question": "What is the person doing?",
     "options": {"start": 1.0}, "sampling": {"temperature": 0, "max_tokens": 32}}
Inputs are keyed by modality as in `Pipeline.ask` (`imu`, `audio`, `depth` + `image`, ...);
relative paths resolve against the jobs file's folder. "questions" (a list) asks several
questions in one chat about the same input.

Results: one JSON object per line, appended, flushed and fsynced as each job ends, so a
killed run loses at most the jobs in flight (in the engine). A rerun skips every id already in the file.
A torn last line (a kill in the middle of a write) is ignored and the next record starts
on a new line after it; the file is never truncated or rewritten. A job whose input is bad
becomes an error record {"id", "error"} and the run goes on.

Pipelining: jobs go through the request engine (`Engine.load(bundle, parallel=N)`): its
encoder worker reads and encodes the next jobs while its N slots decode the current ones
in one batch. Records are still written one by one in job order, so greedy or seeded
sampling writes the same file on every run (equal to single `ask`s, up to near-tie
argmaxes that batched kernels may round differently).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
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


def pick_job_input(job: Job, modalities: list[str]) -> tuple[str | None, Any, Any]:
    """(modality, source, image) of a job, checked as `ask` checks them (the files exist, the
    bundle has the encoder); InputError/ConfigError otherwise. modality None: a text question."""
    from .inputs import check_source, select_input

    sel = select_input(dict(job.inputs))
    if sel.modality is None:
        return None, None, None
    if sel.modality not in modalities:
        raise ConfigError(f"this bundle has no {sel.modality!r} encoder (it has {', '.join(modalities)})")
    source = check_source(sel.source, get_modality(sel.modality).cli_option, sel.modality)
    image = check_source(sel.image, "--image", "image") if sel.image is not None else None
    return sel.modality, source, image


@dataclasses.dataclass
class _Prepared:
    """A job whose first question is in the engine (or the one-line error that stopped it)."""

    job: Job
    modality: str | None = None
    media: Any = None  # engine.Media: read + encoded by the engine's encoder worker
    block: np.ndarray | None = None  # or a block encoded elsewhere (Ray's encoder stage)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # reader metadata of `block`
    handle: Any = None  # engine.Handle of the first question
    error: str | None = None  # a bad input: becomes the job's error record
    crash: BaseException | None = None  # anything else: raised when the job's turn to be written comes
    t0: float = 0.0


class Runner:
    """Runs jobs through an `Engine`'s decode slots into a `ResultsFile`.

    Up to `parallel + prefetch` jobs are in the engine at once: its encoder worker reads
    and encodes the next ones while the slots decode the current ones. Records are
    written in job order (a finished job waits for the ones before it), so a rerun and a
    resumed run write the same file, and a kill loses only the jobs in the engine.
    """

    def __init__(self, engine, results: ResultsFile | None, *, sampling=None, prefetch: int = PREFETCH) -> None:
        from .decoder import Sampling

        self.engine = engine
        self.results = results
        self.sampling = sampling or Sampling()
        self.depth = max(1, engine.parallel + max(0, prefetch))

    # The stages. A bad input (InputError/ConfigError) becomes an error record.
    def _prepare(self, job: Job) -> _Prepared:
        """Pick the job's input and submit its first question (the engine reads and encodes it)."""
        from .engine import Media

        prep = _Prepared(job, t0=time.perf_counter())
        try:
            modality, source, image = pick_job_input(job, self.engine.modalities)
            if modality is not None:
                prep.modality, prep.media = modality, Media(modality, source, dict(job.options), image=image)
            prep.handle = self._submit(prep, [("user", job.questions[0])])
        except (InputError, ConfigError) as exc:
            prep.error = str(exc)
        return prep

    def prepared_block(self, job: Job, modality: str | None, block: np.ndarray | None,
                       meta: dict[str, Any]) -> _Prepared:
        """A job whose input was read and encoded elsewhere: submit its first question with the block."""
        prep = _Prepared(job, modality=modality, block=block, meta=dict(meta), t0=time.perf_counter())
        try:
            prep.handle = self._submit(prep, [("user", job.questions[0])])
        except (InputError, ConfigError) as exc:
            prep.error = str(exc)
        return prep

    def _submit(self, prep: _Prepared, messages: list[tuple[str, str]]):
        from .engine import Request

        sampling = dataclasses.replace(self.sampling, **prep.job.sampling)
        return self.engine.submit(Request(messages=messages, media=prep.media, block=prep.block,
                                          modality=prep.modality if prep.block is not None else None,
                                          sampling=sampling))

    def _answer(self, prep: _Prepared) -> dict[str, Any]:
        """The job's result record: the first answer, then each further question in the same chat."""
        job = prep.job
        res = prep.handle.wait()
        first_s = time.perf_counter() - prep.t0
        messages: list[tuple[str, str]] = [("user", job.questions[0])]
        turns = [_turn(job.questions[0], res)]
        inputs = prep.meta if prep.block is not None else _own_paths(res.inputs, prep.media)
        for question in job.questions[1:]:
            messages += [("assistant", res.text), ("user", question)]
            res = self._submit(prep, list(messages)).wait()  # the conversation's prefix stays in the slot's cache
            turns.append(_turn(question, res))
        record: dict[str, Any] = {"id": job.id}
        if job.multi:
            record["answers"] = turns
        else:
            record.update(turns[0])
        record["modality"] = prep.modality
        record["input"] = inputs
        record["seconds"] = {"first": round(first_s, 4), "total": round(time.perf_counter() - prep.t0, 4)}
        return record

    def _record(self, prep: _Prepared) -> dict[str, Any]:
        """Wait for one job and make its record (answer or error)."""
        if prep.crash is not None:
            raise prep.crash
        if prep.error is None:
            try:
                prep.handle.wait()
            except (InputError, ConfigError) as exc:  # the reader's one-line message
                prep.error = str(exc)
        if prep.error is not None:
            return {"id": prep.job.id, "error": prep.error}
        return self._answer(prep)

    def records(self, items: Iterable, prepare: Callable[[Any], _Prepared] | None = None) -> Iterator[dict[str, Any]]:
        """Each item's record, in order, keeping up to `depth` items in the engine.

        `prepare` turns an item into a `_Prepared` (default: `_prepare` of a `Job`). Leaving
        early (an exception, a closed generator) cancels the jobs still in the engine.
        """
        prepare = prepare or self._prepare
        window: collections.deque[_Prepared] = collections.deque()
        try:
            for item in items:
                try:
                    window.append(prepare(item))
                except Exception as exc:  # noqa: BLE001 - raised in order, after the jobs before it
                    window.append(_Prepared(item if isinstance(item, Job) else None, crash=exc))
                while len(window) >= self.depth or (window and window[0].crash is not None):
                    yield self._record(window.popleft())
            while window:
                yield self._record(window.popleft())
        finally:
            for prep in window:
                if prep.handle is not None:
                    prep.handle.cancel()

    def run(self, jobs: Iterable[Job], progress: Callable[[Progress], None] | None = None) -> Progress:
        """Run every job whose id has no record yet; returns the final counts."""
        jobs = list(jobs)
        todo = [j for j in jobs if j.id not in self.results.done]
        state = Progress(total=len(todo), skipped=len(jobs) - len(todo))
        t0 = time.perf_counter()
        for record in self.records(todo):
            self.results.append(record)
            if "error" in record:
                state.failed += 1
                log.info("job %s failed: %s", record["id"], record["error"])
            else:
                state.done += 1
            state.seconds = time.perf_counter() - t0
            if progress is not None:
                progress(state)
        state.seconds = time.perf_counter() - t0
        return state


def _own_paths(meta: dict[str, Any], media) -> dict[str, Any]:
    """The reader metadata naming this job's files: the engine's block cache is keyed by file
    content, so a hit carries the path of whichever identical file was encoded first."""
    out = dict(meta)
    if media is not None:
        for key, src in (("source", media.source), ("image", media.image)):
            if isinstance(out.get(key), str) and isinstance(src, (str, os.PathLike)):
                out[key] = os.fspath(src)
    return out


def _turn(question: str, res) -> dict[str, Any]:
    return {"question": question, "answer": res.text, "token_ids": list(res.tokens), "stop_reason": res.stop_reason}


def run_batch(engine, jobs: Iterable[Job], results: ResultsFile, *, sampling=None,
              progress: Callable[[Progress], None] | None = None) -> Progress:
    """Answer `jobs` with `engine` (an `Engine`) into `results` (see the module docstring)."""
    return Runner(engine, results, sampling=sampling).run(jobs, progress)
