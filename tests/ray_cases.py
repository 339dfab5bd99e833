"""`onellm batch --ray`: the same jobs on a local two-node Ray cluster (skipped without Ray).

The pipeline has two stages (encoder actors, then decoder actors holding an engine with
two slots); the plan below fits the 2 simulated CPUs with room for both stages.

Run by tests/test_batch_ray.py in a pytest process of its own: Ray leaves threads running
after `ray.shutdown()` (Ray Data's metrics poller, tqdm's monitor) that the rest of the
test session should not share.
"""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from test_batch import GREEDY, _batch, _by_id, _write_jobs, batch_engine  # noqa: E402,F401

from onellm.runtime.batch import ResultsFile, read_jobs, read_results  # noqa: E402
from onellm.runtime.ray_batch import RayPlan, run_batch_ray  # noqa: E402

PLAN = RayPlan(encoders=1, decoders=2, slots=2, encoder_cpus=0.5, decoder_cpus=0.5)


@pytest.fixture(scope="session")
def tiny_bundle(request):
    """The parent test's tiny bundle when it passed one (building it again here takes minutes)."""
    import os
    from pathlib import Path

    given = os.environ.get("ONELLM_RAY_CASES_BUNDLE")
    return Path(given) if given else request.getfixturevalue("_built_tiny_bundle")


@pytest.fixture(scope="session")
def _built_tiny_bundle(tiny_config, tiny_checkpoint, tiny_tokenizer, tmp_path_factory):
    from onellm.export.bundle import build_bundle

    out = tmp_path_factory.mktemp("bundle") / "tiny"  # as conftest's tiny_bundle
    build_bundle(out, tiny_config, tiny_checkpoint, tiny_tokenizer, encoder_precision="fp32",
                 decoder_quant="f32", random_weights=True)
    return out


@pytest.fixture(scope="module")
def two_node_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_ray_batch_equals_local_and_resumes(two_node_cluster, tiny_bundle, batch_engine, tmp_path):
    jobs = read_jobs(_write_jobs(tmp_path))
    _batch(batch_engine, jobs, tmp_path / "local.jsonl")
    out = tmp_path / "ray.jsonl"
    with ResultsFile(out) as results:  # half the jobs first, as if an earlier run was stopped
        first = run_batch_ray(jobs[:3], results, bundle=tiny_bundle, plan=PLAN, sampling=GREEDY, threads=1)
    assert (first.done, first.failed) == (2, 1)
    with ResultsFile(out) as results:
        state = run_batch_ray(jobs, results, bundle=tiny_bundle, plan=PLAN, sampling=GREEDY, threads=1)
    assert (state.skipped, state.done + state.failed) == (3, len(jobs) - 3)
    assert _by_id(read_results(out)) == _by_id(read_results(tmp_path / "local.jsonl"))
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2


def test_ray_batch_refuses_a_missing_bundle_before_starting(tmp_path):
    from onellm.runtime.errors import BundleError

    with ResultsFile(tmp_path / "r.jsonl") as results, pytest.raises(BundleError):
        run_batch_ray(read_jobs(_write_jobs(tmp_path)), results, bundle=tmp_path / "nothing")


def _decoder_pids() -> list[int]:
    """This cluster's decoder actor processes: by the title Ray gives its workers (no dashboard
    needed), among this process's descendants only (other sessions may run Ray on this machine)."""
    import os
    from pathlib import Path

    def parent(pid: int) -> int:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])

    me, pids = os.getpid(), []
    for proc in Path("/proc").iterdir():
        try:
            if not (proc.name.isdigit() and b"_DecodeStage" in (proc / "cmdline").read_bytes()):
                continue
            pid = int(proc.name)
            while pid > 1 and pid != me:
                pid = parent(pid)
            if pid == me:
                pids.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(pids)


def test_killed_decoder_actor_loses_no_job(two_node_cluster, tiny_bundle, batch_engine, tmp_path):
    import os
    import signal

    jobs = read_jobs(_write_jobs(tmp_path))
    _batch(batch_engine, jobs, tmp_path / "local.jsonl")
    killed = []

    def kill_decoders(state):  # after the first record, jobs still in flight: SIGKILL every decoder actor
        if not killed:
            assert state.finished < len(jobs)
            workers = _decoder_pids()
            assert workers, "no decoder actor process found"
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            killed.extend(workers)

    out = tmp_path / "ray.jsonl"
    with ResultsFile(out) as results:
        state = run_batch_ray(jobs, results, bundle=tiny_bundle, plan=PLAN, sampling=GREEDY, threads=1,
                              progress=kill_decoders)
    assert killed and state.done + state.failed == len(jobs)
    assert _by_id(read_results(out)) == _by_id(read_results(tmp_path / "local.jsonl"))  # each id once, all equal


def test_a_node_with_a_mismatched_bundle_refuses_to_start(two_node_cluster, tiny_bundle, tmp_path):
    import shutil

    from onellm.runtime.errors import BundleError
    from onellm.runtime.ray_batch import bundle_files, check_bundle

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    gguf = next(copy.glob("*.gguf"))
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte: the copy on "every node" (a shared path) is damaged
    gguf.write_bytes(bytes(data))
    out = tmp_path / "r.jsonl"
    with ResultsFile(out) as results, pytest.raises(BundleError) as err:
        run_batch_ray(read_jobs(_write_jobs(tmp_path)), results, bundle=copy, plan=PLAN, sampling=GREEDY, threads=1)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("node ") and gguf.name in msg and "checksum mismatch" in msg
    assert out.read_bytes() == b""  # refused before any job ran
    # a copy whose manifest is not the driver's (another export at the same path) is refused too
    other = dict(bundle_files(tiny_bundle))
    other[gguf.name] = "0" * 64
    with pytest.raises(BundleError, match="is not the driver's"):
        check_bundle(tiny_bundle, other, "node X")


def test_served_chat_completion_through_the_openai_client(two_node_cluster, tiny_bundle, batch_engine):
    """`serve --ray`: encoder and decoder deployments behind the local server's ingress; the official
    client gets the same greedy answer as the local engine, for text and for an IMU upload."""
    import base64

    import openai

    from onellm.runtime import ray_serve
    from onellm.runtime.decoder import Sampling
    from onellm.runtime.engine import Media, Request
    from onellm.runtime.server import ServerThread, create_app

    from test_batch import IMU

    plan = ray_serve.ServePlan(encoder_replicas=1, decoder_replicas=1, slots=2, encoder_cpus=0.5, decoder_cpus=0.5,
                               threads=1)
    backend = ray_serve.deploy(tiny_bundle, plan=plan)
    try:
        with ServerThread(create_app(backend, model_id="tiny")) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
            imu = {"type": "input_imu", "input_imu": {"data": base64.b64encode(IMU.read_bytes()).decode(),
                                                      "format": "csv"}}
            for content, media in (("Hello there", None),
                                   ([{"type": "text", "text": "What is the person doing?"}, imu], Media("imu", str(IMU)))):
                got = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                                     max_tokens=8, temperature=0)
                question = content if isinstance(content, str) else content[0]["text"]
                want = batch_engine.submit(Request(messages=[("user", question)], media=media,
                                                   sampling=Sampling.greedy(8))).wait(120)
                assert got.choices[0].message.content == want.text
                assert got.choices[0].finish_reason == want.finish_reason
                assert got.usage.completion_tokens == len(want.tokens)
            stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}],
                                                    max_tokens=8, temperature=0, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert text == got_text_only(batch_engine)
            bad = {"type": "input_imu", "input_imu": {"data": base64.b64encode(b"time_s,acc_x\n0,1\n").decode(),
                                                      "format": "csv"}}
            with pytest.raises(openai.BadRequestError) as err:  # the encoder replica's reader error, as locally
                client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [bad]}], max_tokens=4)
            assert "expected" in str(err.value)
    finally:
        backend.close()


def got_text_only(engine) -> str:
    from onellm.runtime.decoder import Sampling
    from onellm.runtime.engine import Request

    return engine.submit(Request(messages=[("user", "Hello there")], sampling=Sampling.greedy(8))).wait(120).text
