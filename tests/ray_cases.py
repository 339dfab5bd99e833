"""`onellm batch --ray`: the same jobs on a local two-node Ray cluster (skipped without Ray).

Run by tests/test_batch_ray.py in a pytest process of its own: Ray leaves threads running
after `ray.shutdown()` (Ray Data's metrics poller, tqdm's monitor) that the rest of the
test session should not share.
"""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from test_batch import GREEDY, _batch, _by_id, _write_jobs  # noqa: E402

from onellm.runtime.batch import ResultsFile, read_jobs, read_results  # noqa: E402
from onellm.runtime.ray_batch import run_batch_ray  # noqa: E402


@pytest.fixture(scope="module")
def two_node_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_ray_batch_equals_local_and_resumes(two_node_cluster, tiny_bundle, tiny_pipeline, tmp_path):
    jobs = read_jobs(_write_jobs(tmp_path))
    _batch(tiny_pipeline, jobs, tmp_path / "local.jsonl")
    out = tmp_path / "ray.jsonl"
    with ResultsFile(out) as results:  # half the jobs first, as if an earlier run was stopped
        first = run_batch_ray(jobs[:3], results, bundle=tiny_bundle, actors=2, sampling=GREEDY, threads=1)
    assert (first.done, first.failed) == (2, 1)
    with ResultsFile(out) as results:
        state = run_batch_ray(jobs, results, bundle=tiny_bundle, actors=2, sampling=GREEDY, threads=1)
    assert (state.skipped, state.done + state.failed) == (3, len(jobs) - 3)
    assert _by_id(read_results(out)) == _by_id(read_results(tmp_path / "local.jsonl"))
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2


def test_ray_batch_refuses_a_missing_bundle_before_starting(tmp_path):
    from onellm.runtime.errors import BundleError

    with ResultsFile(tmp_path / "r.jsonl") as results, pytest.raises(BundleError):
        run_batch_ray(read_jobs(_write_jobs(tmp_path)), results, bundle=tmp_path / "nothing")


def test_killed_actor_loses_no_job(two_node_cluster, tiny_bundle, tiny_pipeline, tmp_path):
    import os
    import signal
    import time

    from ray.util.state import list_actors

    jobs = read_jobs(_write_jobs(tmp_path))
    _batch(tiny_pipeline, jobs, tmp_path / "local.jsonl")
    killed = []

    def kill_one_actor(state):  # after the first record: the other actor is mid-job
        if not killed:
            # the first record may come before the second actor finished loading its pipeline:
            # wait for it to be ALIVE (a state, polled; bounded so a broken pool fails the test)
            workers = []
            for _ in range(600):
                try:  # the state API answers through the dashboard, which a loaded machine may keep busy
                    workers = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "_Answerer" in a.class_name]
                except Exception:  # noqa: BLE001 - asked again below
                    workers = []
                if len(workers) == 2:
                    break
                time.sleep(0.2)
            assert len(workers) == 2
            os.kill(workers[0].pid, signal.SIGKILL)
            killed.append(workers[0].pid)

    out = tmp_path / "ray.jsonl"
    with ResultsFile(out) as results:
        state = run_batch_ray(jobs, results, bundle=tiny_bundle, actors=2, sampling=GREEDY, threads=1,
                              progress=kill_one_actor)
    assert killed and state.done + state.failed == len(jobs)
    assert _by_id(read_results(out)) == _by_id(read_results(tmp_path / "local.jsonl"))  # each id once, all equal
