"""`onellm batch --ray`: the same jobs as a Ray Data pipeline of two stages (pip install onellm[ray]).

    jobs (rows) --map--> _EncodeStage actors (CPU: reader + onnxruntime encoder sessions)
                --map_batches--> _DecodeStage actors (an `Engine` with N llama.cpp slots each,
                                 fed the encoded blocks; one batch of rows fills its slots)
                --stream--> the driver appends each record to the resumable `ResultsFile`

Bundle placement: every actor opens the bundle from a path its node can reach (a shared
filesystem, or a copy made once per node at the same path). Before the pipeline starts,
one task per alive node checks that node's copy (`check_bundle`): its manifest must list
the same files and checksums as the driver's, and every file must hash to them. A node
that fails refuses the run with a one-line BundleError naming the node and the file; each
actor checks again before its first job (a node that joins later is checked too).

Faults: Ray restarts a killed actor and retries the rows it held. Jobs that still do not
come back are reported (a BackendError naming how many and the first ids, after every
record that did come back was written): a rerun resumes them, nothing is lost silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .batch import Job, Progress, ResultsFile, Runner
from .errors import BackendError, BundleError, ConfigError, InputError

log = logging.getLogger(__name__)

# Rows per Ray Data block: one job each for small runs (a killed actor retries one job), at most
# this many blocks for large ones (a million one-row blocks would cost more to schedule than to run).
MAX_BLOCKS = 4096


# ----------------------------------------------------------------------------- bundle placement


def bundle_files(bundle: str | Path) -> dict[str, str]:
    """The manifest's file table (relative path -> sha256): what every node's copy must match."""
    from .bundle import load_manifest

    return dict(load_manifest(Path(bundle), verify=False).manifest.files)


def check_bundle(bundle: str | Path, expected: dict[str, str], where: str = "this node") -> None:
    """Refuse a bundle copy that is not the driver's: a different file table or a file that
    does not hash to it. Raises a one-line BundleError naming `where` and the file."""
    from .bundle import load_manifest, verify_files

    try:
        files = dict(load_manifest(Path(bundle), verify=False).manifest.files)
    except BundleError as exc:
        raise BundleError(f"{where}: {exc}") from None
    if files != expected:
        diff = sorted(set(files.items()) ^ set(expected.items()))
        rel = diff[0][0] if diff else "?"
        raise BundleError(f"{where}: bundle {bundle} is not the driver's (its manifest lists {rel!r} "
                          f"{'with another checksum' if rel in files and rel in expected else 'differently'}); "
                          "copy the same bundle to every node")
    try:
        verify_files(Path(bundle), files)
    except BundleError as exc:
        raise BundleError(f"{where}: {exc}") from None


def check_nodes(bundle: str | Path, expected: dict[str, str]) -> int:
    """Run `check_bundle` once on every alive node of the connected cluster; returns the node count."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def check(where: str) -> str | None:
        try:
            check_bundle(bundle, expected, where)
        except BundleError as exc:
            return str(exc)
        return None

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(f"node {n.get('NodeManagerAddress', '?')} ({n['NodeID'][:8]})") for n in nodes]
    errors = [e for e in ray.get(refs) if e]
    if errors:
        raise BundleError(errors[0] + (f" (and {len(errors) - 1} more nodes)" if len(errors) > 1 else ""))
    return len(nodes)


def _node_name() -> str:
    import ray

    ctx = ray.get_runtime_context()
    return f"node {ray.util.get_node_ip_address()} ({ctx.get_node_id()[:8]})"


# ----------------------------------------------------------------------------- the two stages


def _job_of(text: str) -> Job:
    fields = json.loads(text)
    return Job(**{**fields, "questions": tuple(fields["questions"])})


class _EncodeStage:
    """A Ray Data actor holding the encoder sessions: one job row -> its block (or its error)."""

    def __init__(self, bundle: str, expected: dict[str, str], device: str = "cpu", threads: int | None = None) -> None:
        from .bundle import load_manifest
        from .encoder import Encoder
        from .registry import resolve_device

        check_bundle(bundle, expected, _node_name())
        b = load_manifest(Path(bundle), verify=False)
        enc_all = b.manifest.encoder.precisions
        provider, _ = resolve_device(device)
        precision = provider.pick_precision(enc_all, b.manifest.encoder.default)
        self.encoder = Encoder(enc_all[precision], b.dir, device=device, threads=threads, verify=False)
        self.modalities = list(b.manifest.modalities)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from .batch import pick_job_input
        from .pipeline import read_input

        job = _job_of(row["job"])
        out = {"job": row["job"], "modality": "", "block": b"", "meta": "{}", "error": "", "encode_s": 0.0}
        t0 = time.perf_counter()
        try:
            modality, source, image = pick_job_input(job, self.modalities)
            if modality is not None:
                item = read_input(modality, source, job.options, image=image)
                block = np.asarray(self.encoder.encode(modality, item.array), dtype=np.float32)
                out.update(modality=modality, block=block.tobytes(), meta=json.dumps(item.meta, default=str))
        except (InputError, ConfigError) as exc:
            out["error"] = str(exc)
        out["encode_s"] = time.perf_counter() - t0
        return out


class _DecodeStage:
    """A Ray Data actor holding an `Engine` (llama.cpp context with `slots` parallel slots):
    a batch of encoded rows -> their records, decoded together in the engine's slots. A batch
    is two rows per slot, so a slot whose job ends early takes the next row of the batch."""

    def __init__(self, bundle: str, expected: dict[str, str], sampling, slots: int = 2,
                 threads: int | None = None) -> None:
        from .engine import Engine

        check_bundle(bundle, expected, _node_name())
        self.engine = Engine.load(bundle, parallel=slots, threads=threads, verify=False)
        self.runner = Runner(self.engine, None, sampling=sampling)

    def _prepared(self, row: dict[str, Any]):
        job = _job_of(row["job"])
        if row["error"]:
            from .batch import _Prepared

            return _Prepared(job, error=str(row["error"]))
        modality = str(row["modality"]) or None
        block = None
        if modality is not None:
            block = np.frombuffer(row["block"], dtype=np.float32).reshape(self.engine.n_inserted, self.engine.n_embd)
        return self.runner.prepared_block(job, modality, block, json.loads(row["meta"]))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["job"]))]
        out = []
        for i, record in enumerate(self.runner.records(rows, prepare=self._prepared)):
            if "seconds" in record:
                record["seconds"]["encode"] = round(float(rows[i]["encode_s"]), 4)
            out.append(json.dumps(record, ensure_ascii=False))
        return {"record": np.array(out, dtype=object)}


# ----------------------------------------------------------------------------- the driver


@dataclasses.dataclass
class RayPlan:
    """How many actors of each stage, and what each asks of the cluster."""

    encoders: int = 1
    decoders: int = 2
    slots: int = 2  # parallel llama.cpp slots per decoder actor
    encoder_cpus: float = 1.0
    decoder_cpus: float = 1.0
    decoder_gpus: float = 0.0


def run_batch_ray(jobs: list[Job], results: ResultsFile, *, bundle: str | Path, address: str | None = None,
                  plan: RayPlan | None = None, sampling=None, device: str = "cpu", threads: int | None = None,
                  progress: Callable[[Progress], None] | None = None) -> Progress:
    """Answer the jobs not yet in `results` on a Ray cluster (`address`: None = the one this
    process is connected to, or a new local one; "auto" or ray://... to join one)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'onellm[ray]'") from None
    from .decoder import Sampling

    plan = plan or RayPlan()
    bundle = str(Path(bundle).resolve())
    expected = bundle_files(bundle)  # a missing or malformed bundle fails here, before Ray starts
    todo = [j for j in jobs if j.id not in results.done]
    state = Progress(total=len(todo), skipped=len(jobs) - len(todo))
    if not todo:
        return state
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    check_nodes(bundle, expected)
    rows = [{"job": json.dumps(dataclasses.asdict(j))} for j in todo]
    ds = (ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_BLOCKS))
          .map(_EncodeStage, concurrency=max(1, plan.encoders), num_cpus=plan.encoder_cpus,
               fn_constructor_kwargs={"bundle": bundle, "expected": expected, "device": device, "threads": threads})
          .map_batches(_DecodeStage, batch_size=2 * max(1, plan.slots), concurrency=max(1, plan.decoders),
                       num_cpus=plan.decoder_cpus, num_gpus=plan.decoder_gpus or None, batch_format="numpy",
                       fn_constructor_kwargs={"bundle": bundle, "expected": expected,
                                              "sampling": sampling or Sampling(), "slots": plan.slots,
                                              "threads": threads}))
    t0 = time.perf_counter()
    seen: set[str] = set()
    rows_back = iter(ds.iter_rows())
    while True:
        try:
            row = next(rows_back)
        except StopIteration:
            break
        except Exception as exc:  # noqa: BLE001 - Ray wraps the cause; report it with what is missing
            raise _stopped(exc, [j.id for j in todo if j.id not in seen]) from None
        record = json.loads(row["record"])
        if record["id"] in seen or record["id"] in results.done:
            continue  # a retried row that had already come back
        results.append(record)
        seen.add(record["id"])
        if "error" in record:
            state.failed += 1
        else:
            state.done += 1
        state.seconds = time.perf_counter() - t0
        if progress is not None:
            progress(state)
    missing = [j.id for j in todo if j.id not in seen]
    if missing:
        raise BackendError(f"{len(missing)} jobs did not come back from Ray (first: {', '.join(missing[:3])}); "
                           "rerun the same command to retry them")
    state.seconds = time.perf_counter() - t0
    return state


def _stopped(exc: BaseException, missing: list[str]) -> BaseException:
    """The one-line error of a Ray run that stopped: a node's bundle refusal, or what was left."""
    cause = _cause(exc)
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    if isinstance(cause, BundleError):
        return BundleError(text)
    return BackendError(f"Ray stopped with {len(missing)} jobs not done (first: {', '.join(missing[:3])}): "
                        f"{type(cause).__name__}: {text}; rerun the same command to retry them")


def _cause(exc: BaseException) -> BaseException:
    """The innermost cause of a Ray error (a RayTaskError keeps it as `.cause`)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc
