"""`onellm serve` for real: uvicorn on a free loopback port, the official `openai` client for
chat, streaming, usage, every media part type, errors and cancellation; raw httpx for
malformed bodies; concurrency, a leak check and client disconnects."""

from __future__ import annotations

import base64
import io
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from onellm.runtime.decoder import Sampling  # noqa: E402
from onellm.runtime.engine import Engine, QueueFull  # noqa: E402
from onellm.runtime.server import ServerThread, create_app  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
KEY = "test-key"
MODEL = "tiny"
Q = "What is this?"


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{_b64(path)}"


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    eng = Engine.load(tiny_bundle, parallel=4)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, model_id=MODEL, api_key=KEY, media_dir=EXAMPLES)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _post(server, body, **kw):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **kw.pop("headers", {})}
    return httpx.post(server.url + "/v1/chat/completions", content=content, headers=headers, timeout=120, **kw)


def _user(*parts, text=Q):
    return [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]


# --------------------------------------------------------------------------- chat, streaming, usage
def test_models_health_and_random_weights_notice(client, server, engine):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    card = models[0].model_dump()
    assert set(card["input_modalities"]) == {"text", *engine.modalities}
    assert card["random_weights"] is True and "RANDOM" in card["notice"]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    health = httpx.get(server.url + "/health").json()  # no key needed
    assert health["status"] == "ok" and health["slots"] == 4


def test_chat_matches_the_pipeline_with_usage(client, tiny_pipeline):
    r = client.chat.completions.create(model=MODEL, messages=_user(
        {"type": "file", "file": {"file_data": _data_url(EXAMPLES / "imu" / "walk.csv", "text/csv"),
                                  "filename": "walk.csv"}}), temperature=0, max_tokens=12)
    alone = tiny_pipeline.ask(Q, imu=str(EXAMPLES / "imu" / "walk.csv"), sampling=Sampling.greedy(12))
    assert r.choices[0].message.content == alone.text
    assert r.model_extra["onellm"]["token_ids"] == alone.token_ids
    n_text = len(tiny_pipeline.prompt_ids(_conv(Q)))
    assert r.usage.prompt_tokens == n_text + 32  # the 32 inserted positions count
    assert r.usage.completion_tokens == len(alone.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == {"max_new_tokens": "length", "eos": "stop"}.get(alone.stop_reason, "stop")


def _conv(q):
    from onellm.runtime.prompt import Conversation

    c = Conversation()
    c.add_question(q)
    return c


def test_streaming_equals_the_whole_answer(client, server):
    msgs = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "Say something long"}]
    whole = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=20)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    raw = _post(server, {"messages": msgs, "stream": True, "max_tokens": 3, "temperature": 0}).text
    events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[0])["object"] == "chat.completion.chunk"
    assert "usage" not in json.loads(events[1])  # only with stream_options.include_usage


def test_sampling_parameters(client):
    msgs = [{"role": "user", "content": "Sample"}]
    a = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0.9, top_p=0.9, seed=7, max_tokens=10)
    b = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0.9, top_p=0.9, seed=7, max_tokens=10)
    assert a.choices[0].message.content == b.choices[0].message.content  # same seed, same draw
    g = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=10)
    text = g.choices[0].message.content
    if len(text) > 3:
        s = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=10, stop=[text[2:4]])
        assert s.choices[0].message.content == text[: text.find(text[2:4])].strip()
        assert s.choices[0].finish_reason == "stop"
    one = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=1)
    assert one.usage.completion_tokens == 1


# --------------------------------------------------------------------------- media parts
def _photo():
    return _data_url(EXAMPLES / "image" / "photo.jpg", "image/jpeg")


MEDIA_CASES = {
    "image_url": ({"type": "image_url", "image_url": {"url": _photo()}}, {"image": "image/photo.jpg"}),
    "image_url_file": ({"type": "image_url", "image_url": {"url": (EXAMPLES / "image" / "photo.jpg").as_uri()}},
                       {"image": "image/photo.jpg"}),
    "input_audio": ({"type": "input_audio", "input_audio": {"data": _b64(EXAMPLES / "audio" / "speech.wav"),
                                                            "format": "wav"}}, {"audio": "audio/speech.wav"}),
    "input_video": ({"type": "input_video", "input_video": {"data": _b64(EXAMPLES / "video" / "clip.mp4"),
                                                            "format": "mp4"}}, {"video": "video/clip.mp4"}),
    "video_url": ({"type": "video_url", "video_url": {"url": _data_url(EXAMPLES / "video" / "clip.mp4", "video/mp4")}},
                  {"video": "video/clip.mp4"}),
    "file_csv": ({"type": "file", "file": {"file_data": _data_url(EXAMPLES / "imu" / "walk.csv", "text/csv"),
                                           "filename": "walk.csv"}}, {"imu": "imu/walk.csv"}),
    "file_ply": ({"type": "file", "file": {"file_data": _data_url(EXAMPLES / "point" / "mug.ply",
                                                                  "application/octet-stream"), "filename": "mug.ply"}},
                 {"point": "point/mug.ply"}),
    "file_npy_fmri": ({"type": "file", "file": {"file_data": _data_url(EXAMPLES / "fmri" / "betas.npy",
                                                                       "application/octet-stream"),
                                                "filename": "betas.npy"}}, {"fmri": "fmri/betas.npy"}),
    "input_imu": ({"type": "input_imu", "input_imu": {"data": _b64(EXAMPLES / "imu" / "walk.csv"), "format": "csv",
                                                      "start": 1.0}}, {"imu": "imu/walk.csv", "options": {"start": 1.0}}),
    "input_point": ({"type": "input_point", "input_point": {"data": _b64(EXAMPLES / "point" / "mug.ply"),
                                                            "format": "ply"}}, {"point": "point/mug.ply"}),
    "input_fmri": ({"type": "input_fmri", "input_fmri": {"data": _b64(EXAMPLES / "fmri" / "betas.npy"),
                                                         "format": "npy"}}, {"fmri": "fmri/betas.npy"}),
    "input_depth": ({"type": "input_depth", "input_depth": {"data": _b64(EXAMPLES / "depth" / "depth.png"),
                                                            "format": "png", "image": _photo()}},
                    {"depth": "depth/depth.png", "image": "image/photo.jpg"}),
    "input_normal": ({"type": "input_normal", "input_normal": {"data": _b64(EXAMPLES / "normal" / "normal.png"),
                                                               "format": "png", "image": _photo()}},
                     {"normal": "normal/normal.png", "image": "image/photo.jpg"}),
}


@pytest.mark.parametrize("case", list(MEDIA_CASES))
def test_each_media_part_gets_the_pipeline_answer(case, client, tiny_pipeline):
    part, inputs = MEDIA_CASES[case]
    inputs = dict(inputs)
    options = inputs.pop("options", None)
    r = client.chat.completions.create(model=MODEL, messages=_user(part), temperature=0, max_tokens=6)
    kwargs = {k: str(EXAMPLES / v) for k, v in inputs.items()}
    alone = tiny_pipeline.ask(Q, sampling=Sampling.greedy(6), options=options, **kwargs)
    assert r.model_extra["onellm"]["modality"] == alone.modality
    assert r.model_extra["onellm"]["token_ids"] == alone.token_ids
    assert r.usage.prompt_tokens == len(tiny_pipeline.prompt_ids(_conv(Q))) + 32


def test_embeddings_part(client, tiny_pipeline):
    block = np.array(tiny_pipeline.encode("imu", str(EXAMPLES / "imu" / "walk.csv"))[0], copy=True)
    buf = io.BytesIO()
    np.save(buf, block)
    part = {"type": "input_embeddings", "input_embeddings": {"data": base64.b64encode(buf.getvalue()).decode(),
                                                              "modality": "imu"}}
    r = client.chat.completions.create(model=MODEL, messages=_user(part), temperature=0, max_tokens=6)
    alone = tiny_pipeline.ask(Q, embeddings=block, modality="imu", sampling=Sampling.greedy(6))
    assert r.model_extra["onellm"]["token_ids"] == alone.token_ids


# --------------------------------------------------------------------------- errors
def _error(resp, status):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "\n" not in err["message"]
    return err


def test_malformed_bodies_are_400s(server):
    assert _error(_post(server, b"{not json"), 400)["code"] == "invalid_json"
    bad64 = {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!notbase64"}}
    assert _error(_post(server, {"messages": _user(bad64)}), 400)["code"] == "invalid_base64"
    err = _error(_post(server, {"messages": _user({"type": "hologram", "hologram": {}})}), 400)
    assert "hologram" in err["message"] and "input_imu" in err["message"]
    two = _user({"type": "image_url", "image_url": {"url": _photo()}},
                {"type": "input_audio", "input_audio": {"data": _b64(EXAMPLES / "audio" / "speech.wav"),
                                                        "format": "wav"}})
    err = _error(_post(server, {"messages": two}), 400)
    assert err["code"] == "too_many_inputs" and "one non-text input per conversation" in err["message"]
    remote = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    assert _error(_post(server, {"messages": _user(remote)}), 400)["code"] == "remote_url_refused"
    outside = {"type": "image_url", "image_url": {"url": Path("/etc/hostname").as_uri()}}
    assert "--media-dir" in _error(_post(server, {"messages": _user(outside)}), 400)["message"]
    assert _error(_post(server, {"messages": [{"role": "user", "content": "x"}], "temperature": 9}), 400)["param"] \
        == "temperature"
    assert _error(_post(server, {"messages": [{"role": "assistant", "content": "x"}]}), 400)
    assert _error(_post(server, b"[1, 2]"), 400)
    no_photo = {"type": "input_depth", "input_depth": {"data": _b64(EXAMPLES / "depth" / "depth.png"), "format": "png"}}
    assert "photo" in _error(_post(server, {"messages": _user(no_photo)}), 400)["message"]
    opt = {"type": "input_imu", "input_imu": {"data": _b64(EXAMPLES / "imu" / "walk.csv"), "format": "csv", "speed": 2}}
    assert "speed" in _error(_post(server, {"messages": _user(opt)}), 400)["message"]


def test_reader_errors_are_400_with_the_readers_message(server):
    junk = base64.b64encode(b"time,foo\n1,2\n").decode()
    part = {"type": "file", "file": {"file_data": f"data:text/csv;base64,{junk}", "filename": "bad.csv"}}
    err = _error(_post(server, {"messages": _user(part)}), 400)
    assert "input.csv" in err["message"] and "expected" in err["message"]


def test_auth_model_and_route_errors(server, client):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert _error(httpx.get(server.url + "/metrics"), 401)["type"] == "authentication_error"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert _error(httpx.get(server.url + "/v2/nothing", headers={"Authorization": f"Bearer {KEY}"}), 404)


def test_oversized_body_is_413(engine):
    with ServerThread(create_app(engine, model_id=MODEL, max_body=4096)) as small:
        big = {"messages": _user({"type": "image_url", "image_url": {"url": _photo()}})}
        assert _error(_post(small, big), 413)["code"] == "body_too_large"
        ok = _post(small, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
        assert ok.status_code == 200


def test_full_queue_is_429_with_retry_after(server, engine, monkeypatch):
    def full(*a, **kw):
        raise QueueFull("the request queue is full (64 waiting); retry later")

    monkeypatch.setattr(engine, "submit", full)
    resp = _post(server, {"messages": [{"role": "user", "content": "x"}]})
    assert _error(resp, 429)["code"] == "queue_full" and resp.headers["Retry-After"] == "1"


# --------------------------------------------------------------------------- concurrency, leaks, disconnects
def test_eight_clients_get_the_answers_of_requests_run_alone(server, client, engine, tiny_pipeline):
    from test_engine import _assert_same_or_near_tie

    walk = EXAMPLES / "imu" / "walk.csv"
    part = {"type": "file", "file": {"file_data": _data_url(walk, "text/csv"), "filename": "walk.csv"}}
    questions = [f"Question {i}: what is the person doing?" for i in range(8)]
    block = np.array(tiny_pipeline.encode("imu", str(walk))[0], copy=True)
    alone = {q: tiny_pipeline.ask(q, imu=str(walk), sampling=Sampling.greedy(16)).token_ids for q in questions}
    got: dict[tuple[int, int], tuple[str, list[int]]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(i):
        try:
            start.wait()
            for k in range(3):
                q = questions[(i + k) % 8]
                r = client.chat.completions.create(model=MODEL, messages=_user(part, text=q), temperature=0,
                                                   max_tokens=16)
                got[(i, k)] = (q, r.model_extra["onellm"]["token_ids"])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(got) == 24  # nothing lost
    for q, tokens in got.values():  # nothing mixed up: each answer is its own question's
        _assert_same_or_near_tie(tiny_pipeline, q, tokens, alone[q], block)
    identical = sum(tokens == alone[q] for q, tokens in got.values())
    print(f"concurrency: {len(got)} answers from 8 clients, {identical} identical to the request alone, "
          f"{len(got) - identical} parting at a near-tie")
    assert engine.stats()["slots_busy"] == 0


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_two_hundred_requests_leave_rss_slots_and_temp_files_flat(server, engine):
    walk = EXAMPLES / "imu" / "walk.csv"
    part = {"type": "file", "file": {"file_data": _data_url(walk, "text/csv"), "filename": "walk.csv"}}
    tmp = Path(tempfile.gettempdir())
    before_tmp = set(tmp.glob("onellm-serve-*"))
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        def one(i):
            body = {"messages": _user(part, text=f"q{i % 5}") if i % 2 else [{"role": "user", "content": f"q{i % 5}"}],
                    "max_tokens": 2, "temperature": 0}
            assert http.post("/v1/chat/completions", json=body).status_code == 200

        for i in range(20):  # warm-up: allocator pools, caches
            one(i)
        rss0 = _rss_mib()
        for i in range(200):
            one(i)
        rss1 = _rss_mib()
    stats = engine.stats()
    print(f"leak check: RSS {rss0:.1f} -> {rss1:.1f} MiB over 200 requests; stats {stats}")
    assert rss1 - rss0 < 24, (rss0, rss1)
    assert stats["slots_busy"] == 0 and stats["queue_depth"] == 0
    assert set(tmp.glob("onellm-serve-*")) == before_tmp  # every upload was removed


def test_client_disconnect_mid_stream_cancels_and_frees_the_slot(server, engine, monkeypatch):
    real = engine.ctx.decode

    def slow_decode(batch):  # a slower machine: the answer cannot finish before the client leaves
        time.sleep(0.005)
        return real(batch)

    monkeypatch.setattr(engine.ctx, "decode", slow_decode)
    cancelled0 = engine.counters["finished_cancelled"]
    body = {"messages": [{"role": "user", "content": "Tell me a very long story"}], "stream": True,
            "max_tokens": 1000, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        seen = [next(lines) for _ in range(3)]
        assert any(line.startswith("data: ") for line in seen)
        assert engine.stats()["slots_busy"] == 1
    for _ in range(600):  # wait (bounded) for the server to notice; no timing asserted
        if engine.stats()["slots_busy"] == 0:
            break
        time.sleep(0.05)
    assert engine.stats()["slots_busy"] == 0
    assert engine.counters["finished_cancelled"] == cancelled0 + 1
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'onellm_requests_total{outcome="disconnected"}' in metrics


def test_metrics_text(server):
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("onellm_requests_total", "onellm_queue_depth", "onellm_slots_busy",
                 "onellm_time_to_first_token_seconds_bucket", "onellm_decode_tokens_per_second_bucket"):
        assert name in text, name
    assert 'onellm_requests_total{outcome="rejected"}' in text or "onellm_requests_total" in text


def test_serve_command_reports_a_missing_bundle_in_one_line(tmp_path):
    from click.testing import CliRunner

    from onellm.cli import main

    result = CliRunner().invoke(main, ["serve", "--bundle", str(tmp_path / "none"), "--port", "1"])
    assert result.exit_code != 0
    assert "Traceback" not in result.output and "none" in result.output


def test_media_part_tables_come_from_the_modality_specs():
    """Every input name has its typed part, and a `file` part's extension picks the one standalone
    modality whose spec lists it (ambiguous ones, like .npy and .txt, are not in the table)."""
    from onellm.runtime import server
    from onellm.runtime.modalities import all_modalities, input_names

    assert {f"input_{n}" for n in input_names()} <= set(server.MEDIA_PART_TYPES)
    assert server._TYPED["input_depth"] == "rgbd" and server._TYPED["input_normal"] == "rgbn"
    specs = all_modalities()
    for ext, modality in server._EXT_MODALITY.items():
        assert ext in specs[modality].file_types and not specs[modality].requires_image
        assert [m for m, s in specs.items() if ext in s.file_types and not s.requires_image] == [modality]
    assert ".npy" not in server._EXT_MODALITY and ".txt" not in server._EXT_MODALITY
    assert server._EXT_MODALITY[".ply"] == "point" and server._EXT_MODALITY[".csv"] == "imu"


def test_serve_kv_cache_is_refused_with_ray_before_anything_starts(tiny_bundle):
    """--kv-cache reaches Engine.load only; with --ray it is a usage error, not silently dropped."""
    from click.testing import CliRunner

    from onellm.cli import main

    result = CliRunner().invoke(main, ["serve", "--bundle", str(tiny_bundle), "--ray", "--kv-cache", "q8_0",
                                       "--port", "1"])
    assert result.exit_code == 2 and "--kv-cache" in result.output and "Traceback" not in result.output
    bad = CliRunner().invoke(main, ["serve", "--bundle", str(tiny_bundle), "--kv-cache", "q4_0", "--port", "1"])
    assert bad.exit_code == 2 and "q8_0" in bad.output  # the choices are named
