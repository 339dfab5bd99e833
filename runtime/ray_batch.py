"""`onellm batch --ray`: the same jobs as a Ray Data pipeline (pip install onellm[ray]).

Each Ray actor holds one `Pipeline` (encoder sessions + llama.cpp context), loaded from a
bundle path every node can reach; `Pipeline.load` verifies the bundle's checksums on each
node before its first job. Rows are jobs; the actors run the local runner's two stages
(`Runner._prepare`, `Runner._answer`) and return the result record. The driver appends
each record to the same resumable `ResultsFile` as it streams back (ids already there are
never sent), so resuming, error records and the never-truncated file work as locally.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .batch import Job, Progress, ResultsFile, Runner
from .errors import ConfigError

log = logging.getLogger(__name__)


class _Answerer:
    """A Ray Data actor: one loaded pipeline answering one job row at a time."""

    def __init__(self, bundle: str, sampling, device: str = "cpu", threads: int | None = None) -> None:
        from .pipeline import Pipeline

        self.pipe = Pipeline.load(bundle, device=device, threads=threads)
        self.runner = Runner(self.pipe, None, sampling=sampling)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        fields = json.loads(row["job"])
        job = Job(**{**fields, "questions": tuple(fields["questions"])})
        prep = self.runner._prepare(job)
        record = {"id": job.id, "error": prep.error} if prep.error is not None else self.runner._answer(prep)
        return {"record": json.dumps(record, ensure_ascii=False)}


def run_batch_ray(jobs: list[Job], results: ResultsFile, *, bundle: str | Path, address: str | None = None,
                  actors: int = 2, cpus_per_actor: float = 1.0, sampling=None, device: str = "cpu",
                  threads: int | None = None, progress: Callable[[Progress], None] | None = None) -> Progress:
    """Answer the jobs not yet in `results` on a Ray cluster (`address`: None = the one this
    process is connected to, or a new local one; "auto" or ray://... to join one)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'onellm[ray]'") from None
    from .bundle import load_manifest
    from .decoder import Sampling

    load_manifest(Path(bundle), verify=False)  # a missing or malformed bundle fails here, not in every actor
    todo = [j for j in jobs if j.id not in results.done]
    state = Progress(total=len(todo), skipped=len(jobs) - len(todo))
    if not todo:
        return state
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    rows = [{"job": json.dumps(dataclasses.asdict(j))} for j in todo]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map(
        _Answerer, concurrency=max(1, actors), num_cpus=cpus_per_actor,
        fn_constructor_kwargs={"bundle": str(Path(bundle).resolve()), "sampling": sampling or Sampling(),
                               "device": device, "threads": threads})
    t0 = time.perf_counter()
    for row in ds.iter_rows():
        record = json.loads(row["record"])
        results.append(record)
        if "error" in record:
            state.failed += 1
        else:
            state.done += 1
        state.seconds = time.perf_counter() - t0
        if progress is not None:
            progress(state)
    state.seconds = time.perf_counter() - t0
    return state
