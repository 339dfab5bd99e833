"""The ov-int8 encoder: NNCF static int8 QDQ graphs, calibrated at export, run by OpenVINO.

Export side: the trunk and the UPM are quantised from the plain fp32 graphs on calibration
feeds of every exported modality (seeded inputs, examples/, user arrays); the small graphs
stay fp32. Runtime side: the same chain contract on OpenVINO (shapes fixed per modality,
buffers shared), run when asked (int8 stays the CPU's pick: ov-int8 holds more memory),
refused with a clear error when OpenVINO is not installed. Speed is measured in benchmarks/openvino_encoder.py, not here.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

pytest.importorskip("openvino")
pytest.importorskip("nncf")
torch = pytest.importorskip("torch")

from onellm.runtime import registry  # noqa: E402
from onellm.runtime.errors import BackendError, ConfigError  # noqa: E402

MODALITIES = ("image", "imu", "point")


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def ov_export(tiny_model, tiny_config, tmp_path_factory):
    """(directory, {precision: EncoderVariant}) for int8 and ov-int8 of three modalities."""
    from onellm.export.onnx_encoder import export_encoder_variants

    out = tmp_path_factory.mktemp("ov-encoder")
    return out, export_encoder_variants(tiny_model, tiny_config, out, list(MODALITIES), ("int8", "ov-int8"))


def test_trunk_and_upm_are_static_int8_and_the_rest_plain_fp32(ov_export):
    out, variants = ov_export
    v = variants["ov-int8"]
    for name, graph in v.graphs.items():
        model = onnx.load(str(out / graph.file))
        ops = {n.op_type for n in model.graph.node}
        domains = {n.domain for n in model.graph.node} - {"", "ai.onnx"}
        assert not domains, f"{name}: onnxruntime-only ops {domains} (OpenVINO reads plain ONNX)"
        if name in ("trunk", "upm"):
            assert graph.precision == "ov-int8"
            assert {"QuantizeLinear", "DequantizeLinear"} <= ops, name
            q = graph.quantization
            assert q["format"] == "QDQ" and q["runtime"] == "openvino"
            # 4 seeded inputs per modality, plus examples/ (this is a source checkout)
            assert q["calibration_inputs"] == 5 * len(MODALITIES), q
        else:
            assert graph.precision == "fp32" and "QuantizeLinear" not in ops, name
            assert graph.quantization is None


def test_chains_meet_the_int8_floor_and_match_the_reference(ov_export, tiny_model):
    from onellm.export.onnx_encoder import chain_input, reference_block
    from onellm.runtime.encoder import Encoder

    out, variants = ov_export
    floor = registry.ENCODER_PRECISIONS["ov-int8"].min_cosine
    with Encoder(variants["ov-int8"], out) as ov, Encoder(variants["int8"], out) as ort:
        assert ov.runtime == "openvino" and ort.runtime == "onnxruntime"
        for m in MODALITIES:
            assert variants["ov-int8"].modalities[m].parity["cosine"] >= floor
            x = chain_input(m, [77, 1])  # not a calibration input
            ref = reference_block(tiny_model, m, x)
            got = ov.encode(m, x).copy()
            assert got.shape == ref.shape
            # the tiny model's int8 chains sit at 0.9997-0.99999; a wrong buffer binding is near 0
            assert _cos(got, ref) >= 0.999, m
            assert _cos(got, ort.encode(m, x)) >= 0.999, m


def test_encode_many_rows_equal_single_encodes(ov_export):
    from onellm.export.onnx_encoder import chain_input
    from onellm.runtime.encoder import Encoder

    out, variants = ov_export
    with Encoder(variants["ov-int8"], out) as enc:
        for m in ("imu", "point"):
            xs = [chain_input(m, [5, k]) for k in range(3)]
            singles = [enc.encode(m, x).copy() for x in xs]
            batch = enc.encode_many(m, xs)
            assert batch.shape == (3, *singles[0].shape)
            scale = float(np.abs(singles[0]).max())
            for k in range(3):
                # the batch runs a dynamic-shape compile, the single input a static one: equal to
                # rounding (measured: 0 for imu, 0.012 of a 2.9 range for point)...
                err = float(np.abs(batch[k] - singles[k]).max())
                assert err <= 0.02 * scale, (m, k, err)
                # ...and row k is input k's block, nearer to it than to any other input's
                for j in range(3):
                    if j != k:
                        assert err < float(np.abs(batch[k] - singles[j]).max()), (m, k, j)


def test_cpu_runs_ov_int8_when_asked_or_alone_and_only_where_openvino_is_installed(monkeypatch):
    cpu = registry.EXECUTION_PROVIDERS["cpu"]
    # int8 first: ov-int8 is faster but holds ~1.1 GiB more at 7B (benchmarks/RESULTS.md)
    assert cpu.pick_precision({"fp32": 1, "int8": 1, "ov-int8": 1}, "fp32") == "int8"
    assert cpu.pick_precision({"fp32": 1, "ov-int8": 1}, "fp32") == "ov-int8"
    monkeypatch.setattr(registry, "openvino_available", lambda: False)
    assert cpu.pick_precision({"fp32": 1, "ov-int8": 1}, "fp32") == "fp32"
    assert registry.EXECUTION_PROVIDERS["cuda"].pick_precision({"fp32": 1, "ov-int8": 1}, "fp32") == "fp32"


def test_without_openvino_or_off_the_cpu_the_error_says_what_to_do(ov_export, monkeypatch):
    import onellm.runtime.encoder as encoder_mod

    out, variants = ov_export
    with pytest.raises(BackendError, match="CPU only"):
        encoder_mod.Encoder(variants["ov-int8"], out, device="cuda")
    monkeypatch.setattr(encoder_mod, "openvino_available", lambda: False)
    with pytest.raises(BackendError, match=r"openvino.*extra"):
        encoder_mod.Encoder(variants["ov-int8"], out)


def test_export_refuses_ov_int8_without_nncf(tiny_model, tiny_config, tmp_path, monkeypatch):
    import importlib.util

    from onellm.export.onnx_encoder import export_encoder_variants

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    with pytest.raises(ConfigError, match="nncf"):
        export_encoder_variants(tiny_model, tiny_config, tmp_path, ["imu"], ("ov-int8",))
    assert not any(tmp_path.iterdir())  # refused before anything was traced or written


def test_calibration_arrays_join_the_seeded_ones_and_are_checked(tiny_model, tiny_config):
    from onellm.export import onnx_encoder as oe

    ref = oe.fp32_reference(tiny_model)
    jobs = oe.plan_graphs(ref, tiny_config, ["imu"])
    shape = (6, 400)
    base = oe.calibration_feeds(ref, tiny_config, jobs, ["imu"], 0, {})
    extra = [np.full(shape, 9.81, np.float32), np.zeros(shape, np.float32)]
    more = oe.calibration_feeds(ref, tiny_config, jobs, ["imu"], 0, {"imu": extra})
    assert len(more["trunk"]) == len(base["trunk"]) + 2 == len(more["upm"])
    # the added feeds are those arrays' own tokens, not copies of the seeded ones
    assert not np.allclose(more["trunk"][-1]["tokens"], more["trunk"][-2]["tokens"])
    assert set(more["upm"][0]) == {"upm_input", "routing"}
    with pytest.raises(ConfigError, match=r"expected shape \[6, 400\]"):
        oe.calibration_feeds(ref, tiny_config, jobs, ["imu"], 0, {"imu": [np.zeros((6, 10), np.float32)]})
    with pytest.raises(ConfigError, match="not exported"):
        oe.calibration_feeds(ref, tiny_config, jobs, ["imu"], 0, {"image": extra})


def test_calibrate_option_reads_recordings_and_refuses_misuse(tmp_path):
    import onellm.cli as cli
    from onellm.runtime.modalities import example_file

    walk = example_file("imu")
    got = cli._calibration_inputs((f"imu={walk}",), "int8,ov-int8")
    assert list(got) == ["imu"] and got["imu"][0].shape == (6, 400)
    # the walk's gravity is on y (examples/README.md): the reader's array says so
    assert abs(float(np.mean(got["imu"][0][1]))) > 5 > abs(float(np.mean(got["imu"][0][0])))
    np.save(tmp_path / "bad.npy", np.zeros((6, 10), np.float32))
    cases = {
        (f"imu={walk}",): ("int8", "add ov-int8"),
        ("imu",): ("ov-int8", "MODALITY=PATH"),
        (f"smell={walk}",): ("ov-int8", "unknown modality"),
        (f"imu={tmp_path / 'missing.csv'}",): ("ov-int8", "does not exist"),
        (f"imu={tmp_path / 'bad.npy'}",): ("ov-int8", r"shape \[6, 400\]"),
    }
    for items, (prec, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            cli._calibration_inputs(items, prec)
    # on the command line: a non-zero exit, the message, no traceback, nothing written
    result = CliRunner().invoke(cli.main, ["export", "--demo", "--out", str(tmp_path / "b"), "--calibrate",
                                           f"imu={walk}"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "add ov-int8" in result.output
    assert not (tmp_path / "b").exists()


def test_a_bundle_with_ov_int8_answers_through_it_when_asked(tiny_config, tiny_checkpoint, tiny_tokenizer,
                                                             tmp_path):
    from onellm.export.bundle import build_bundle
    from onellm.runtime.decoder import Sampling
    from onellm.runtime.modalities import example_file
    from onellm.runtime.pipeline import Pipeline

    out = tmp_path / "bundle"
    build_bundle(out, tiny_config, tiny_checkpoint, tiny_tokenizer, modalities=["imu"],
                 encoder_precision="int8,ov-int8", decoder_quant="f32", random_weights=True)
    with Pipeline.load(out, device="cpu", parallel=1, precision="ov-int8") as pipe:
        assert pipe.precision == "ov-int8" and pipe.encoder.runtime == "openvino"
        ov_answer = pipe.ask("What is the person doing?", imu=str(example_file("imu")), sampling=Sampling.greedy(4))
    with Pipeline.load(out, device="cpu", parallel=1) as pipe:
        assert pipe.precision == "int8" and pipe.encoder.runtime == "onnxruntime"
        ort_answer = pipe.ask("What is the person doing?", imu=str(example_file("imu")), sampling=Sampling.greedy(4))
    # both answered through the whole pipeline; the blocks differ by int8 rounding, so the
    # random model's greedy tokens may differ and are not compared
    assert 1 <= ov_answer.usage["completion_tokens"] <= 4 and 1 <= ort_answer.usage["completion_tokens"] <= 4
