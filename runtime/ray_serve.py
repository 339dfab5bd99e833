"""`onellm serve --ray`: the encoder and the decoder as two Ray Serve deployments behind the
same OpenAI-compatible ingress as the local server (pip install onellm[ray]).

    HTTP -> create_app(RayBackend) (this process: parsing, auth, SSE, metrics; runtime/server.py)
         -> EncoderDeployment x --encoder-replicas (CPU: reader + encoder sessions; the upload's
            bytes travel with the call, so a replica on another node needs no shared /tmp)
         -> DecoderDeployment x --decoder-replicas (an `Engine` with --parallel slots each, fed
            the block; its text streams back through a streaming deployment handle)

`RayBackend` has the local Engine's serving surface (`submit(Request, on_event)` -> a handle
with `cancel()`, `stats()`, the bundle facts), so the HTTP layer is the same code and answers
the same schema. Every replica checks its node's bundle against the driver's file table and
checksums before it serves (`ray_batch.check_bundle`); a mismatch stops the deployment with the
one-line BundleError. A replica that dies is restarted by Serve; the requests it held end
with a 500 `backend_error` naming the failure (never a hang, never a silent drop).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .engine import EngineClosed, Limits, QueueFull, Request, Result
from .errors import BackendError, BundleError, ConfigError, InputError, OneLLMError

log = logging.getLogger(__name__)

APP_NAME = "onellm"
_ERRORS = {c.__name__: c for c in (InputError, ConfigError, BackendError, BundleError, QueueFull, EngineClosed)}


@dataclasses.dataclass
class ServePlan:
    """Replica counts and what each replica asks of the cluster."""

    encoder_replicas: int = 1
    decoder_replicas: int = 1
    slots: int = 2  # parallel llama.cpp slots per decoder replica
    encoder_cpus: float = 1.0
    decoder_cpus: float = 1.0
    decoder_gpus: float = 0.0
    threads: int | None = None  # CPU threads per replica (None: the machine's default)


def _error_value(exc: BaseException) -> tuple[str, str]:
    """An error as (class name, one-line message): plain data that crosses Ray unchanged."""
    name = type(exc).__name__ if type(exc).__name__ in _ERRORS else "BackendError"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return name, text if isinstance(exc, OneLLMError) else f"{type(exc).__name__}: {text}"


def _error_from(value: tuple[str, str]) -> OneLLMError:
    cls = _ERRORS.get(value[0], BackendError)
    exc = cls.__new__(cls)  # InputError's own __init__ composes a message; this one is composed already
    Exception.__init__(exc, value[1])
    return exc


class EncoderReplica:
    """Reads an uploaded input and runs the encoder: (modality, bytes, ...) -> (block, reader metadata)."""

    def __init__(self, bundle: str, expected: dict[str, str], device: str = "cpu", threads: int | None = None) -> None:
        from .ray_batch import _EncodeStage

        self.stage = _EncodeStage(bundle, expected, device, threads)  # checks the bundle, opens the sessions

    def encode(self, modality: str, data: bytes, ext: str, options: dict[str, Any],
               image: tuple[bytes, str] | None = None) -> tuple[np.ndarray | None, dict[str, Any] | tuple[str, str]]:
        from .pipeline import read_input

        with tempfile.TemporaryDirectory(prefix="onellm-enc-") as tmp:
            source = Path(tmp) / f"input{ext}"
            source.write_bytes(data)
            photo = None
            if image is not None:
                photo = Path(tmp) / f"photo{image[1]}"
                photo.write_bytes(image[0])
            try:
                item = read_input(modality, str(source), options, image=str(photo) if photo else None)
                block = np.array(self.stage.encoder.encode(modality, item.array), dtype=np.float32, copy=True)
            except OneLLMError as exc:
                return None, _error_value(exc)
        return block, dict(item.meta)


class DecoderReplica:
    """An `Engine` answering requests that carry their block; events stream back to the ingress."""

    def __init__(self, bundle: str, expected: dict[str, str], slots: int = 2, threads: int | None = None) -> None:
        from .engine import Engine
        from .ray_batch import _node_name, check_bundle

        check_bundle(bundle, expected, _node_name())
        self.engine = Engine.load(bundle, parallel=slots, threads=threads, verify=False)

    def info(self) -> dict[str, Any]:
        return {"n_ctx_slot": self.engine.n_ctx_slot, "parallel": self.engine.parallel,
                "max_tokens": self.engine.limits.max_tokens}

    def generate(self, payload: dict[str, Any]):
        """Yields ("text", str) ..., then ("done", Result fields) or ("error", (class, message))."""
        from .decoder import Sampling

        try:
            req = Request(messages=[tuple(m) for m in payload["messages"]], block=payload.get("block"),
                          modality=payload.get("modality"), sampling=Sampling(**payload["sampling"]),
                          stop=tuple(payload.get("stop", ())))
            handle = self.engine.submit(req)
        except OneLLMError as exc:
            yield "error", _error_value(exc)
            return
        try:
            for chunk in handle:
                yield "text", chunk
            yield "done", dataclasses.asdict(handle.result)
        except OneLLMError as exc:
            yield "error", _error_value(exc)
        finally:
            if not handle.done:  # the ingress went away (its stream was cancelled): free the slot
                handle.cancel()


class _RayHandle:
    """One request on the Ray backend: `cancel()` from any thread, like the engine's Handle."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.stream = None  # the decoder's streaming response, once started

    def cancel(self) -> None:
        self.request.cancel.set()
        stream = self.stream
        if stream is not None:
            stream.cancel()


class RayBackend:
    """The serving surface of an `Engine`, answered by the two Serve deployments."""

    def __init__(self, bundle: str | Path, encoder, decoder, *, plan: ServePlan, limits: Limits | None = None) -> None:
        from .bundle import load_manifest

        b = load_manifest(Path(bundle), verify=False)
        self.manifest, self.bundle_dir = b.manifest, b.dir
        self.modalities = list(b.manifest.modalities)
        self.random_weights = b.manifest.random_weights
        self.encoder, self.decoder = encoder, decoder
        info = decoder.info.remote().result()
        self.parallel = info["parallel"] * plan.decoder_replicas
        self.n_ctx_slot = info["n_ctx_slot"]
        self.limits = limits or Limits()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._served = 0

    def close(self) -> None:
        """Remove the deployments (the cluster stays)."""
        shutdown()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            n = self._in_flight
            return {"queue_depth": max(0, n - self.parallel), "slots": self.parallel,
                    "slots_busy": min(n, self.parallel), "submitted": self._served, "backend": "ray"}

    def submit(self, request: Request, on_event) -> _RayHandle:
        with self._lock:
            if self._in_flight >= self.parallel + self.limits.max_queue:
                raise QueueFull(f"the request queue is full ({self.limits.max_queue} waiting); retry later")
            self._in_flight += 1
            self._served += 1
        handle = _RayHandle(request)
        threading.Thread(target=self._run, args=(handle, on_event), name="onellm-ray-request", daemon=True).start()
        return handle

    def _run(self, handle: _RayHandle, on_event) -> None:
        req = handle.request
        try:
            block, modality, inputs = self._block(req)
            if req.cancel.is_set():
                on_event("done", Result(stop_reason="cancelled", modality=modality))
                return
            payload = {"messages": [list(m) for m in req.messages], "block": block, "modality": modality,
                       "sampling": dataclasses.asdict(req.sampling), "stop": list(req.stop)}
            handle.stream = self.decoder.options(stream=True).generate.remote(payload)
            for kind, value in handle.stream:
                if kind == "text":
                    on_event("text", value)
                elif kind == "done":
                    on_event("done", Result(**{**value, "inputs": inputs or value.get("inputs", {})}))
                else:
                    on_event("error", _error_from(value))
        except OneLLMError as exc:  # the encoder replica's reader message: a 400, as locally
            on_event("error", exc)
        except Exception as exc:  # noqa: BLE001 - a replica lost or a cancelled stream: the request ends
            if req.cancel.is_set():
                on_event("done", Result(stop_reason="cancelled"))
            else:
                log.warning("a Ray request failed: %s", exc)
                on_event("error", BackendError(f"the Ray backend failed this request: {_error_value(exc)[1]}"))
        finally:
            with self._lock:
                self._in_flight -= 1

    def _block(self, req: Request) -> tuple[Any, str | None, dict[str, Any]]:
        """The request's block: given, or encoded by an encoder replica from the upload's bytes."""
        if req.block is not None:
            return np.asarray(req.block, dtype=np.float32), req.modality, {"source": "embeddings"}
        media = req.media
        if media is None:
            return None, None, {}
        try:
            data = Path(media.source).read_bytes()
            image = (Path(media.image).read_bytes(), Path(media.image).suffix) if media.image else None
            ext = Path(media.source).suffix
        finally:
            if media.cleanup is not None:
                media.cleanup()
        block, meta = self.encoder.encode.remote(media.modality, data, ext, dict(media.options), image).result()
        if block is None:
            raise _error_from(meta)
        meta = dict(meta)
        meta["source"] = os.path.basename(str(media.source))  # the upload's temporary name, not the replica's
        return block, media.modality, meta


def deploy(bundle: str | Path, *, address: str | None = None, plan: ServePlan | None = None,
           limits: Limits | None = None) -> RayBackend:
    """Start (or join) Ray, check every node's bundle, deploy both stages; returns the backend."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ConfigError("--ray needs Ray Serve: pip install 'onellm[ray]'") from None
    from .ray_batch import bundle_files, check_nodes

    plan = plan or ServePlan()
    bundle = str(Path(bundle).resolve())
    expected = bundle_files(bundle)
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    check_nodes(bundle, expected)
    serve.start(http_options={"location": "NoServer"})  # the ingress is ours (runtime/server.py), not Serve's proxy
    enc = serve.deployment(EncoderReplica, name="onellm-encoder", num_replicas=max(1, plan.encoder_replicas),
                           ray_actor_options={"num_cpus": plan.encoder_cpus})
    dec = serve.deployment(DecoderReplica, name="onellm-decoder", num_replicas=max(1, plan.decoder_replicas),
                           max_ongoing_requests=max(1, plan.slots) * 4,
                           ray_actor_options={"num_cpus": plan.decoder_cpus, "num_gpus": plan.decoder_gpus})
    try:
        encoder = serve.run(enc.bind(bundle, expected, "cpu", plan.threads), name=f"{APP_NAME}-encoder",
                            route_prefix=None)
        decoder = serve.run(dec.bind(bundle, expected, plan.slots, plan.threads), name=f"{APP_NAME}-decoder",
                            route_prefix=None)
    except Exception as exc:  # noqa: BLE001 - a replica that refused its bundle: its one line
        from .ray_batch import _cause

        cause = _cause(exc)
        if isinstance(cause, BundleError) or "BundleError" in str(exc):
            line = next((x for x in str(exc).splitlines() if "BundleError" in x), str(cause))
            raise BundleError(line.split("BundleError:", 1)[-1].strip()) from None
        raise BackendError(f"Ray Serve could not start the deployments: {_error_value(cause)[1]}") from None
    return RayBackend(bundle, encoder, decoder, plan=plan, limits=limits)


def shutdown() -> None:
    """Remove the deployments (the cluster stays)."""
    try:
        from ray import serve

        serve.shutdown()
    except Exception as exc:  # noqa: BLE001 - best effort at exit
        log.debug("serve shutdown: %s", exc)
