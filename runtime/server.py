"""`onellm serve`: an OpenAI-compatible HTTP front end of the request engine (FastAPI + uvicorn).

This layer only translates: OpenAI-shaped JSON -> `engine.Request`, and the engine's
events -> a `chat.completion` or a stream of `chat.completion.chunk`s (SSE). It never
touches llama.cpp or onnxruntime.

Endpoints: POST /v1/chat/completions, GET /v1/models[/{id}], GET /health, GET /metrics.

Media go in as content parts of a user message (one non-text input per conversation):

- `image_url` {"url": "data:image/png;base64,..."} (`file://` only under --media-dir;
  remote URLs are refused: the runtime is offline)
- `input_audio` {"data": base64, "format": "wav"|"mp3"|"flac"|"ogg", "start": s}
- `input_video` {"data": base64, "format": "mp4"} or `video_url` {"url": "data:video/mp4;base64,..."}
- `file` {"file_data": "data:...;base64,...", "filename": "walk.csv"}: dispatched by
  extension (and for .npy by shape): IMU CSV, PLY/PCD/XYZ/NPY point clouds, fMRI .npy,
  images, audio, video
- typed parts `input_imu`, `input_point`, `input_fmri` {"data", "format", reader options},
  `input_depth` / `input_normal` {"data", "format", "image": "data:image/...;base64,..."}
- `input_embeddings` {"data": base64 .npy from `onellm encode`, "modality": "imu"}

Reader options (IMU `rate`, `start`, `accel_units`, `gyro_units`; audio `start`; video
`fps`) are fields of the part. Uploaded bytes go to a private temporary directory
(mode 0700) under a name with the right extension, and are removed once read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import dataclasses
import hmac
import inspect
import io
import json
import logging
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

from .decoder import Sampling
from .engine import Engine, EngineClosed, Media, QueueFull, Request, Result
from .errors import BackendError, ConfigError, InputError, OneLLMError
from .modalities import all_modalities, get_modality, input_names
from .prompt import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P

try:  # the `serve` extra; the annotations of the route functions need the name at module level
    from fastapi import Request as HttpRequest
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    HttpRequest = None
    _IMPORT_ERROR: ImportError | None = _exc
else:
    _IMPORT_ERROR = None

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 96 << 20  # bytes of one request body (base64 makes media ~4/3 larger)
RANDOM_NOTICE = "this bundle has RANDOM weights (the tiny demo model): its answers are meaningless text"

_MIME_EXT = {
    "image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/webp": ".webp", "image/bmp": ".bmp",
    "audio/wav": ".wav", "audio/x-wav": ".wav", "audio/wave": ".wav", "audio/mpeg": ".mp3", "audio/mp3": ".mp3",
    "audio/flac": ".flac", "audio/ogg": ".ogg", "video/mp4": ".mp4", "video/webm": ".webm",
    "video/quicktime": ".mov", "video/x-matroska": ".mkv", "video/x-msvideo": ".avi", "text/csv": ".csv",
}


def _file_part_extensions() -> dict[str, str]:
    """The `file` part: extension -> modality, from the modality specs' file types. An extension
    decides when exactly one modality that stands alone claims it (a depth or normal map needs
    its photo, so it goes as a typed part); .npy is decided by its shape."""
    claims: dict[str, set[str]] = collections.defaultdict(set)
    for spec in all_modalities().values():
        if not spec.requires_image:
            for ext in spec.file_types:
                claims[ext].add(spec.name)
    return {ext: names.pop() for ext, names in sorted(claims.items()) if len(names) == 1 and ext != ".npy"}


_EXT_MODALITY = _file_part_extensions()
# the typed parts: `input_<name>` for every input name of the specs (`input_depth` -> rgbd)
_TYPED = {f"input_{name}": modality for name, modality in input_names().items()}
MEDIA_PART_TYPES = ("image_url", "video_url", "file", "input_embeddings", *_TYPED)


class ApiError(Exception):
    """An error answered as OpenAI-shaped JSON with an HTTP status."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.retry_after = retry_after

    def response(self):
        from fastapi.responses import JSONResponse

        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=headers)


def api_error_for(exc: OneLLMError, param: str | None = None) -> ApiError:
    """Our error types -> HTTP: bad input 400, a full queue 429, shutting down 503, a backend fault 500."""
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), type_="rate_limit_error", code="queue_full", retry_after=1)
    if isinstance(exc, EngineClosed):
        return ApiError(503, str(exc), type_="server_error", code="unavailable", retry_after=5)
    if isinstance(exc, (InputError, ConfigError)):
        return ApiError(400, str(exc), param=param, code="invalid_input")
    if isinstance(exc, BackendError):
        return ApiError(500, str(exc), type_="server_error", code="backend_error")
    return ApiError(400, str(exc), param=param)


# ---------------------------------------------------------------------------- parsing
class _Upload:
    """Media bytes of one request written to a private temp dir; removed by cleanup()."""

    def __init__(self) -> None:
        self.dir: Path | None = None

    def write(self, name: str, data: bytes) -> Path:
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="onellm-serve-"))  # mode 0700
        path = self.dir / name
        path.write_bytes(data)
        return path

    def cleanup(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def _b64(data: Any, param: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise ApiError(400, f"{param}: expected base64 text, found {type(data).__name__}", param=param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param}: expected valid base64 data, found characters or padding that are not base64",
                       param=param, code="invalid_base64") from None


def _data_url(url: Any, param: str) -> tuple[str, bytes]:
    """(mime type, bytes) of a data: URL (base64 only)."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ApiError(400, f"{param}: expected a data: URL", param=param)
    head, sep, payload = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        raise ApiError(400, f"{param}: expected a base64 data: URL (data:<mime>;base64,<data>)", param=param)
    return head[: -len(";base64")].split(";")[0].lower(), _b64(payload, param)


def _ext_for(mime: str, fallback: str) -> str:
    return _MIME_EXT.get(mime, fallback)


def _npy_shape(data: bytes, param: str) -> tuple[int, ...]:
    try:
        f = io.BytesIO(data)
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read(f)
        return tuple(shape)
    except Exception as exc:  # noqa: BLE001 - numpy raises several types on a bad header
        raise ApiError(400, f"{param}: expected a .npy array, found an unreadable header ({exc})", param=param) from None


class MediaPart:
    """One parsed media part: modality, the bytes and their extension (or a block), options."""

    def __init__(self, modality: str | None, data: bytes | None, ext: str, options: dict[str, Any],
                 param: str, image: tuple[bytes, str] | None = None, block: np.ndarray | None = None,
                 path: Path | None = None) -> None:
        self.modality, self.data, self.ext, self.options = modality, data, ext, options
        self.param, self.image, self.block, self.path = param, image, block, path


def _reader_options(modality: str, fields: dict[str, Any], param: str) -> dict[str, Any]:
    sig = inspect.signature(get_modality(modality).preprocess)
    allowed = [n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY and n not in ("image", "timestamps")]
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ApiError(400, f"{param}: unknown reader option(s) {', '.join(unknown)} for {modality} "
                       f"(it takes: {', '.join(allowed) or 'none'})", param=param)
    return dict(fields)


def parse_media_part(part: dict[str, Any], param: str, media_dir: Path | None) -> MediaPart:
    """A content part of a media type -> MediaPart (400 ApiError on anything malformed)."""
    kind = part["type"]
    body = part.get(kind)
    if not isinstance(body, dict):
        raise ApiError(400, f"{param}.{kind}: expected an object", param=param)
    if kind in ("image_url", "video_url"):
        modality = "image" if kind == "image_url" else "video"
        url = body.get("url")
        if not isinstance(url, str):
            raise ApiError(400, f"{param}.{kind}.url: expected a URL string", param=param)
        scheme = urlparse(url).scheme.lower()
        if scheme == "data":
            mime, data = _data_url(url, f"{param}.{kind}.url")
            return MediaPart(modality, data, _ext_for(mime, ".png" if modality == "image" else ".mp4"), {}, param)
        if scheme == "file":
            if media_dir is None:
                raise ApiError(400, f"{param}.{kind}.url: file:// URLs are refused (the server was started "
                               "without --media-dir)", param=param)
            path = Path(unquote(urlparse(url).path)).resolve()
            root = media_dir.resolve()
            if root != path and root not in path.parents:
                raise ApiError(400, f"{param}.{kind}.url: expected a file under --media-dir {root}, found {path}",
                               param=param)
            if not path.is_file():
                raise ApiError(400, f"{param}.{kind}.url: {path}: no such file", param=param)
            return MediaPart(modality, None, path.suffix.lower(), {}, param, path=path)
        raise ApiError(400, f"{param}.{kind}.url: expected a data: URL, found a {scheme or 'relative'} URL; remote "
                       "URLs are refused (the server is offline)", param=param, code="remote_url_refused")
    if kind == "input_embeddings":
        data = _b64(body.get("data"), f"{param}.input_embeddings.data")
        try:
            block = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ApiError(400, f"{param}.input_embeddings.data: expected a .npy array from `onellm encode` ({exc})",
                           param=param) from None
        modality = body.get("modality")
        if not isinstance(modality, str):
            raise ApiError(400, f"{param}.input_embeddings.modality: expected the modality the block encodes",
                           param=param)
        return MediaPart(modality, None, "", {}, param, block=block)
    if kind == "file":
        fname = body.get("filename") or ""
        mime, data = _data_url(body.get("file_data"), f"{param}.file.file_data")
        ext = Path(fname).suffix.lower() or _ext_for(mime, "")
        if ext == ".npy":
            shape = _npy_shape(data, f"{param}.file")
            size = int(np.prod(shape)) if shape else 1
            if size == 15724 and max(shape) == 15724:
                modality = "fmri"
            elif len(shape) == 2 and shape[1] >= 3 and shape[0] > 64:
                modality = "point"
            else:
                raise ApiError(400, f"{param}.file: a .npy of shape {list(shape)} is not recognised as an fMRI "
                               "vector [15724] or a point cloud [N, 3|6]; send it as an input_imu, input_point or "
                               "input_fmri part", param=param)
        elif ext in _EXT_MODALITY:
            modality = _EXT_MODALITY[ext]
        else:
            raise ApiError(400, f"{param}.file: expected a file of a known kind ({', '.join(sorted(_EXT_MODALITY))}, "
                           f".npy), found {fname or mime or 'no filename'}", param=param)
        return MediaPart(modality, data, ext, {}, param)
    modality = _TYPED[kind]
    fields = dict(body)
    fmt = str(fields.pop("format", "") or "").lower().lstrip(".")
    raw = fields.pop("data", None)
    if isinstance(raw, str) and raw.startswith("data:"):
        mime, data = _data_url(raw, f"{param}.{kind}.data")
        ext = f".{fmt}" if fmt else _ext_for(mime, "")
    else:
        data = _b64(raw, f"{param}.{kind}.data")
        ext = f".{fmt}" if fmt else ""
    if ext == ".jpeg":
        ext = ".jpg"
    types = get_modality(modality).file_types
    if ext not in types and not (modality == "imu" and ext == ".csv"):
        raise ApiError(400, f"{param}.{kind}.format: expected one of {', '.join(t.lstrip('.') for t in types)}, "
                       f"found {fmt or 'none'}", param=param)
    image = None
    if get_modality(modality).requires_image:
        photo = fields.pop("image", None)
        if isinstance(photo, dict):
            photo = photo.get("url") or photo.get("data")
        if photo is None:
            raise ApiError(400, f"{param}.{kind}.image: a {modality[-1] == 'd' and 'depth' or 'normal'} map needs its "
                           "RGB photo (a data:image/...;base64 URL)", param=param)
        mime, pdata = _data_url(photo, f"{param}.{kind}.image")
        image = (pdata, _ext_for(mime, ".png"))
    return MediaPart(modality, data, ext, _reader_options(modality, fields, f"{param}.{kind}"), param, image=image)


def parse_messages(messages: Any, media_dir: Path | None) -> tuple[list[tuple[str, str]], MediaPart | None]:
    """OpenAI messages -> (role, text) turns and the one media part (system messages are dropped:
    the model's `v1` template has its own system prompt)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty array of messages", param="messages")
    turns: list[tuple[str, str]] = []
    media: MediaPart | None = None
    for i, msg in enumerate(messages):
        p = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ApiError(400, f"{p}: expected an object", param=p)
        role = msg.get("role")
        if role in ("system", "developer"):
            continue
        if role not in ("user", "assistant"):
            raise ApiError(400, f"{p}.role: expected user, assistant or system, found {role!r}", param=p)
        content = msg.get("content")
        texts: list[str] = []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                pp = f"{p}.content[{j}]"
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise ApiError(400, f"{pp}: expected a content part object with a type", param=pp)
                if part["type"] == "text":
                    if not isinstance(part.get("text"), str):
                        raise ApiError(400, f"{pp}.text: expected a string", param=pp)
                    texts.append(part["text"])
                elif part["type"] in MEDIA_PART_TYPES:
                    if role != "user":
                        raise ApiError(400, f"{pp}: media parts belong in user messages", param=pp)
                    if media is not None:
                        raise ApiError(400, f"{pp}: the model takes one non-text input per conversation; this one "
                                       f"already has one at {media.param} (start a new conversation for another input)",
                                       param=pp, code="too_many_inputs")
                    media = parse_media_part(part, pp, media_dir)
                else:
                    raise ApiError(400, f"{pp}.type: unknown content part type {part['type']!r} (known: text, "
                                   f"{', '.join(MEDIA_PART_TYPES)})", param=pp)
        elif content is None and role == "assistant":
            pass
        else:
            raise ApiError(400, f"{p}.content: expected a string or an array of content parts", param=p)
        turns.append((role, "\n".join(texts)))
    return turns, media


def _number(body: dict, key: str, default, lo: float, hi: float, kind=float):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise ApiError(400, f"{key}: expected a number, found {v!r}", param=key)
    if not lo <= v <= hi:
        raise ApiError(400, f"{key}: expected a value in [{lo}, {hi}], found {v}", param=key)
    return kind(v)


def parse_sampling(body: dict, cap: int) -> tuple[Sampling, tuple[str, ...]]:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_NEW_TOKENS, cap)
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, 1, 1 << 30, int)
    n = body.get("n")
    if n not in (None, 1):
        raise ApiError(400, f"n: only n=1 is supported, found {n!r}", param="n")
    temperature = _number(body, "temperature", DEFAULT_TEMPERATURE, 0.0, 2.0)
    top_p = _number(body, "top_p", DEFAULT_TOP_P if body.get("temperature") is None else 1.0, 0.0, 1.0)
    seed = _number(body, "seed", 0, -(1 << 63), (1 << 64) - 1, int)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = tuple(stop)
    else:
        raise ApiError(400, "stop: expected a string or an array of up to 4 strings", param="stop")
    return Sampling(temperature=temperature, top_p=top_p if top_p > 0 else 1e-6, seed=seed,
                    max_new_tokens=min(max_tokens, cap)), stops


# ---------------------------------------------------------------------------- metrics
class Metrics:
    """Prometheus series of one server (its own registry, so several apps may live in one process)."""

    def __init__(self, engine: Engine) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no *_created series: scrapers do not need them

        self.registry = r = CollectorRegistry()
        self.requests = Counter("onellm_requests", "Chat completion requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("onellm_prompt_tokens", "Prompt positions (inserted rows included)", registry=r)
        self.completion_tokens = Counter("onellm_completion_tokens", "Generated tokens", registry=r)
        Gauge("onellm_queue_depth", "Requests waiting for the encoder or a slot", registry=r).set_function(
            lambda: engine.stats()["queue_depth"])
        Gauge("onellm_slots_busy", "Slots serving a request", registry=r).set_function(
            lambda: engine.stats()["slots_busy"])
        Gauge("onellm_slots", "Slots (--parallel)", registry=r).set(engine.parallel)
        self.ttft = Histogram("onellm_time_to_first_token_seconds", "Submit to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tps = Histogram("onellm_decode_tokens_per_second", "Decode speed of one request", registry=r,
                             buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000))

    def observe(self, res: Result) -> None:
        self.requests.labels(res.finish_reason).inc()
        self.prompt_tokens.inc(res.prompt_tokens)
        self.completion_tokens.inc(res.completion_tokens)
        if res.tokens:
            self.ttft.observe(res.ttft_s)
        if res.decode_tokens_per_s > 0:
            self.tps.observe(res.decode_tokens_per_s)


# ---------------------------------------------------------------------------- the app
def _created_unix(created: str) -> int:
    """The manifest's ISO export time as Unix seconds (0 when unreadable)."""
    import datetime

    try:
        return int(datetime.datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp())
    except (ValueError, AttributeError):
        return 0


def model_card(engine: Engine, model_id: str) -> dict[str, Any]:
    card = {"id": model_id, "object": "model", "created": _created_unix(engine.manifest.created),
            "owned_by": "onellm", "input_modalities": ["text", *engine.modalities],
            "random_weights": engine.random_weights, "parallel": engine.parallel,
            "context_per_request": engine.n_ctx_slot}
    if engine.random_weights:
        card["notice"] = RANDOM_NOTICE
    return card


def _usage(res: Result) -> dict[str, Any]:
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
            "total_tokens": res.prompt_tokens + res.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": res.cached_tokens}}


def _extension(res: Result) -> dict[str, Any]:
    """Our extension field (clients ignore unknown fields), like the timings of llama.cpp's server."""
    return {"token_ids": res.tokens, "stop_reason": res.stop_reason, "modality": res.modality,
            "ttft_s": res.ttft_s, "queue_s": res.queue_s, "decode_tokens_per_s": res.decode_tokens_per_s,
            "input": json.loads(json.dumps(res.inputs, default=str))}


@dataclasses.dataclass
class _Served:
    """What the routes of one app share: the backend and the server's settings.

    The backend is a local `Engine` or anything with its serving surface (`RayBackend`):
    `submit(Request, on_event)` -> a handle with `cancel()`, `stats()`, and the attributes
    `manifest`, `modalities`, `random_weights`, `parallel`, `n_ctx_slot`, `bundle_dir`, `limits`.
    """

    backend: Any
    model_id: str
    media_root: Path | None
    max_body: int
    metrics: Metrics

    def check_model(self, name: Any) -> None:
        if name is not None and name != self.model_id:
            raise ApiError(404, f"model {name!r} does not exist (this server has {self.model_id!r})", param="model",
                           code="model_not_found")


def create_app(engine, *, model_id: str | None = None, api_key: str | None = None,
               media_dir: str | Path | None = None, max_body: int = DEFAULT_MAX_BODY):
    """The FastAPI app serving `engine`: a local `Engine` or a backend with its serving surface
    (see `_Served`), which stays owned by the caller."""
    if _IMPORT_ERROR is not None:
        raise ConfigError(f"onellm serve needs the serve extra (pip install 'onellm[serve]'): {_IMPORT_ERROR}")
    from fastapi import FastAPI

    served = _Served(engine, model_id or engine.bundle_dir.name, Path(media_dir).resolve() if media_dir else None,
                     max_body, Metrics(engine))
    app = FastAPI(title="onellm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics = engine, served.metrics
    _add_error_handlers(app, served.metrics)
    _add_auth(app, api_key)
    _add_info_routes(app, served)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await _chat_completion(served, request)

    return app


def _add_error_handlers(app, metrics: Metrics) -> None:
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def _api_error(_req, exc: ApiError):
        if exc.status >= 400:
            metrics.requests.labels("rejected" if exc.status < 500 else "error").inc()
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), type_="invalid_request_error",
                        code="not_found" if exc.status_code == 404 else None).response()


def _add_auth(app, api_key: str | None) -> None:
    @app.middleware("http")
    async def _auth(request: HttpRequest, call_next):
        if api_key and request.url.path != "/health":
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                return ApiError(401, "expected 'Authorization: Bearer <api key>' with the server's --api-key",
                                type_="authentication_error", code="invalid_api_key").response()
        return await call_next(request)


def _add_info_routes(app, served: _Served) -> None:
    from fastapi.responses import PlainTextResponse

    engine, model_id = served.backend, served.model_id

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **engine.stats()}

    @app.get("/metrics")
    async def metrics_text():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(served.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(engine, model_id)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        served.check_model(name)
        return model_card(engine, model_id)


async def _read_body(request: HttpRequest, max_body: int) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise ApiError(413, f"request body: expected at most {max_body} bytes, found {declared}",
                       code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise ApiError(413, f"request body: expected at most {max_body} bytes, found more",
                           code="body_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body: expected JSON, found a parse error ({exc})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body: expected a JSON object, found {type(body).__name__}")
    return body


def _build_request(served: _Served, body: dict, upload: _Upload) -> Request:
    engine = served.backend
    served.check_model(body.get("model"))
    turns, part = parse_messages(body.get("messages"), served.media_root)
    sampling, stops = parse_sampling(body, engine.limits.max_tokens)
    req = Request(messages=turns, sampling=sampling, stop=stops)
    if part is None:
        return req
    if part.modality not in engine.modalities:
        raise ApiError(400, f"{part.param}: this bundle has no {part.modality} encoder (it has "
                       f"{', '.join(engine.modalities)})", param=part.param)
    if part.block is not None:
        req.block, req.modality = part.block, part.modality
        return req
    lim = engine.limits.max_media_bytes
    if part.data is not None and len(part.data) > lim:
        raise ApiError(413, f"{part.param}: expected media of at most {lim} bytes, found {len(part.data)}",
                       param=part.param, code="media_too_large")
    source = part.path if part.path is not None else upload.write(f"input{part.ext}", part.data)
    image = upload.write(f"photo{part.image[1]}", part.image[0]) if part.image else None
    req.media = Media(part.modality, str(source), part.options, image=str(image) if image else None,
                      cleanup=upload.cleanup)
    return req


@dataclasses.dataclass
class _Call:
    """One chat completion in flight: its handle, its events and how it answers."""

    served: _Served
    request: HttpRequest
    handle: Any
    events: _EventBridge
    include_usage: bool
    cid: str = dataclasses.field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    async def next_event(self) -> tuple[str, Any]:
        """The next engine event; a client gone away cancels the request."""
        while True:
            try:
                return await self.events.get(0.25)
            except asyncio.TimeoutError:
                if await self.request.is_disconnected():
                    self.handle.cancel()
                    raise asyncio.CancelledError() from None

    def chunk(self, delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True,
              extension: dict | None = None) -> str:
        out = {"id": self.cid, "object": "chat.completion.chunk", "created": self.created,
               "model": self.served.model_id,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if choices else []}
        if self.include_usage:
            out["usage"] = usage
        if extension is not None:
            out["onellm"] = extension
        return f"data: {json.dumps(out)}\n\n"


async def _chat_completion(served: _Served, request: HttpRequest):
    body = await _read_body(request, served.max_body)
    opts = body.get("stream_options") or {}
    upload = _Upload()
    events = _EventBridge(asyncio.get_running_loop())
    try:
        handle = served.backend.submit(_build_request(served, body, upload), on_event=events.put)
    except ApiError:
        upload.cleanup()
        raise
    except OneLLMError as exc:
        upload.cleanup()
        raise api_error_for(exc, "messages") from None
    call = _Call(served, request, handle, events, bool(isinstance(opts, dict) and opts.get("include_usage")))
    # The first event decides the status: a reader error is still a 400 here.
    try:
        first = await call.next_event()
    except asyncio.CancelledError:
        handle.cancel()
        raise
    if first[0] == "error":
        raise api_error_for(first[1], "messages")
    if body.get("stream"):
        from fastapi.responses import StreamingResponse

        return StreamingResponse(_sse(call, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _whole_answer(call, first)


async def _whole_answer(call: _Call, first: tuple[str, Any]):
    from fastapi.responses import JSONResponse

    kind, value = first
    try:
        while kind == "text":
            kind, value = await call.next_event()
    finally:
        if kind == "text":  # the client went away: free the slot now
            call.handle.cancel()
    if kind == "error":
        raise api_error_for(value, "messages")
    res: Result = value
    call.served.metrics.observe(res)
    return JSONResponse({
        "id": call.cid, "object": "chat.completion", "created": call.created, "model": call.served.model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                     "finish_reason": res.finish_reason, "logprobs": None}],
        "usage": _usage(res),
        "onellm": _extension(res),
    })


async def _sse(call: _Call, first: tuple[str, Any]):
    kind, value = first
    ended = False
    try:
        yield call.chunk({"role": "assistant", "content": ""})
        while kind == "text":
            yield call.chunk({"content": value})
            kind, value = await call.events.get()
        if kind == "error":
            err = api_error_for(value)
            error = {"message": err.message, "type": err.type, "param": None, "code": err.code}
            yield f"data: {json.dumps({'error': error})}\n\n"
        else:
            call.served.metrics.observe(value)
            yield call.chunk({}, value.finish_reason)
            if call.include_usage:
                yield call.chunk({}, usage=_usage(value), choices=False, extension=_extension(value))
        ended = True
        yield "data: [DONE]\n\n"
    finally:
        if not ended and kind == "text":  # the client went away (or the server stops): free the slot now
            call.handle.cancel()
            call.served.metrics.requests.labels("disconnected").inc()


class _EventBridge:
    """Engine events (from its threads) -> one request's coroutine.

    One event-loop wake-up per burst instead of one per token, and text that piled up
    while the loop was busy comes out as one chunk: under load the HTTP side keeps up
    with the batched decode instead of paying a thread hand-off per token.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._scheduled = False

    def put(self, kind: str, value: Any) -> None:  # engine threads
        with self._lock:
            self._items.append((kind, value))
            if self._scheduled:
                return
            self._scheduled = True
        self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self._lock:
            self._scheduled = False
        self._ready.set()

    async def get(self, timeout: float | None = None) -> tuple[str, Any]:
        while True:
            with self._lock:
                if self._items:
                    kind, value = self._items.popleft()
                    if kind == "text":
                        parts = [value]
                        while self._items and self._items[0][0] == "text":
                            parts.append(self._items.popleft()[1])
                        value = "".join(parts)
                    return kind, value
                self._ready.clear()
            await asyncio.wait_for(self._ready.wait(), timeout)


# ---------------------------------------------------------------------------- running
def free_port(host: str = "127.0.0.1") -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving an app on a background thread (tests, benchmarks, desktop apps)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None) -> None:
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="warning",
                                                    lifespan="off", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="onellm-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise BackendError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_server(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, **app_options) -> None:
    """Serve until interrupted (the `onellm serve` command)."""
    import uvicorn

    app = create_app(engine, **app_options)
    uvicorn.run(app, host=host, port=port, log_level="info", lifespan="off", timeout_graceful_shutdown=3)
