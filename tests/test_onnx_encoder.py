"""Encoder export to ONNX (onellm.export.onnx_encoder): parity, storage, algebraic folds.

The graphs are traced once per session (`tiny_encoder_export` in conftest.py, every
registered modality, fp32/fp16/int8). Parity is re-measured here on fresh inputs, not
read back from the figures the export recorded.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onellm.export import onnx_encoder as oe  # noqa: E402
from onellm.ref.upm import run_expert  # noqa: E402
from onellm.runtime.encoder import Encoder  # noqa: E402
from onellm.runtime.errors import ConfigError, ParityError  # noqa: E402
from onellm.runtime.modalities import all_modalities, get_modality  # noqa: E402

MODALITIES = list(all_modalities())


def _chain_parity(model, entries, root, modality, seed):
    x = get_modality(modality).dummy_input(np.random.default_rng(seed)).astype(np.float32)
    with torch.no_grad():
        expected = model.encode(modality, torch.from_numpy(x)[None]).numpy()[0]
    with Encoder(entries, root, verify=True) as enc:
        got = enc.encode(modality, x).copy()
    return oe.compare(expected, got), got.shape


def test_every_registered_modality_is_exported(tiny_encoder_export, tiny_config):
    _, results = tiny_encoder_export
    for precision, entries in results.items():
        assert sorted(entries["modalities"]) == sorted(MODALITIES) == sorted(tiny_config.modalities), precision
        for m, entry in entries["modalities"].items():
            assert all(g in entries["graphs"] for g in entry["chain"]), (precision, m)


@pytest.mark.parametrize("modality", MODALITIES)
def test_fp32_chain_matches_torch(tiny_encoder_export, tiny_model, tiny_config, modality):
    root, results = tiny_encoder_export
    fig, shape = _chain_parity(tiny_model, results["fp32"], root, modality, seed=101)
    assert shape == (tiny_config.n_inserted, tiny_config.decoder.dim)
    assert fig["cosine"] >= oe.PARITY_MIN_COSINE["fp32"], fig
    assert fig["max_abs"] < 1e-4, fig
    recorded = results["fp32"]["modalities"][modality]["parity"]
    assert recorded["cosine"] >= oe.PARITY_MIN_COSINE["fp32"]


@pytest.mark.parametrize("modality", MODALITIES)
def test_int8_chain_within_threshold(tiny_encoder_export, tiny_model, modality):
    root, results = tiny_encoder_export
    fig, _ = _chain_parity(tiny_model, results["int8"], root, modality, seed=202)
    assert fig["cosine"] >= oe.PARITY_MIN_COSINE["int8"], fig
    # int8 really quantised something: not bit-equal to fp32
    assert fig["max_abs"] > 0


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_fp16_chain_within_threshold(tiny_encoder_export, tiny_model, modality):
    root, results = tiny_encoder_export
    fig, _ = _chain_parity(tiny_model, results["fp16"], root, modality, seed=303)
    assert fig["cosine"] >= oe.PARITY_MIN_COSINE["fp16"], fig


def test_graph_entries_describe_the_files(tiny_encoder_export, tiny_config):
    root, results = tiny_encoder_export
    for precision, entries in results.items():
        assert entries["n_embd"] == tiny_config.decoder.dim and entries["n_inserted"] == 32
        for name, g in entries["graphs"].items():
            path = root / g["file"]
            assert path.is_file()
            assert g["sha256"] == oe.sha256_file(path)
            assert g["parity"]["min_cosine"] >= oe.PARITY_MIN_COSINE[g["precision"]]
            assert all(s["dtype"] == "float32" for s in g["inputs"] + g["outputs"]), name
        trunk = entries["graphs"]["trunk"]
        assert [d for d in trunk["inputs"][0]["shape"][:2]] == ["n", "tokens"]  # dynamic N and L
        post = entries["graphs"]["post.image"]["outputs"][0]
        assert post["shape"][1:] == [32, tiny_config.decoder.dim]
    # quantisation shrank the big matmul graphs; fp16 halved them
    g32, g8, g16 = (results[p]["graphs"] for p in ("fp32", "int8", "fp16"))
    for name in ("trunk", "upm", "tokenizer.fmri"):
        assert g8[name]["bytes"] < 0.5 * g32[name]["bytes"], name
        assert g16[name]["bytes"] < 0.6 * g32[name]["bytes"], name
    assert g16["tokenizer.point"]["precision"] == "fp32"  # spec: the point tokenizer runs in fp32


def _encoder_param_bytes(model, prefix_filter):
    return sum(p.numel() * 4 for n, p in model.named_parameters() if prefix_filter(n))


def test_no_weight_is_stored_twice(tiny_encoder_export, tiny_model):
    root, results = tiny_encoder_export
    graphs = results["fp32"]["graphs"]
    paths = [root / g["file"] for g in graphs.values()]
    counted = oe.count_initializer_bytes(paths)
    # every non-constant tensor of 64+ elements appears in exactly one place
    repeated = {d: where for d, where in counted["digests"].items() if len(where) > 1}
    assert not repeated, repeated
    # the CLIP trunk's weights are in the trunk graph, once
    def is_trunk(n):
        return n.startswith("clip.visual.") and not n.startswith(
            ("clip.visual.conv1", "clip.visual.positional_embedding", "clip.visual.proj"))

    trunk_bytes = _encoder_param_bytes(tiny_model, is_trunk)
    assert trunk_bytes * 0.97 <= counted["per_file"][f"trunk.fp32.onnx"] <= trunk_bytes * 1.03
    # and everything together is the encoder's parameters once (routers and `proj` not at all)
    def is_exported(n):
        head = n.split(".")[0]
        return head not in ("tok_embeddings", "layers", "norm", "output", "routers") and n != "clip.visual.proj"

    total = sum(counted["per_file"].values())
    expected = _encoder_param_bytes(tiny_model, is_exported)
    assert expected * 0.97 <= total <= expected * 1.03, (total, expected)


def test_routing_fold_equals_router_on_the_sequence(tiny_model, tiny_encoder_export):
    """Upstream runs the router on every row of [resample tokens; features]; rows 0..29 are all
    that is read and they are the tokens, so the folded constant equals it for any input."""
    _, results = tiny_encoder_export
    rng = torch.Generator().manual_seed(5)
    for m in MODALITIES:
        router = tiny_model.routers[m]
        tokens = tiny_model.resample_tokens[m]
        feats = torch.randn(2, 9, tokens.shape[-1], generator=rng)
        seq = torch.cat([tokens.expand(2, -1, -1), feats], dim=1)
        with torch.no_grad():
            w = torch.sigmoid(router.fc2(torch.nn.functional.gelu(router.fc1(seq))))
            w = (w / w.sum(-1, keepdim=True))[:, : tokens.shape[1]]
        folded = torch.tensor(results["fp32"]["modalities"][m]["routing_weights"])
        assert folded.shape == (30, 3)
        torch.testing.assert_close(w, folded.expand(2, -1, -1), rtol=1e-6, atol=1e-7)


def test_last_block_computes_only_read_rows(tiny_model):
    """Queries of only the first 30 rows in each expert's last block == the full block, sliced."""
    rng = torch.Generator().manual_seed(6)
    width = tiny_model.cfg.clip.width
    x = torch.randn(2, 30 + 17, width, generator=rng)
    with torch.no_grad():
        for blocks in tiny_model.resample_layers.values():
            torch.testing.assert_close(run_expert(blocks, x, 30), run_expert(blocks, x, 30, full_last_block=True),
                                       rtol=1e-5, atol=1e-6)
        h = torch.randn(1, 257, width, generator=rng)
        torch.testing.assert_close(tiny_model.upm("image", h), tiny_model.upm("image", h, full_last_block=True),
                                   rtol=1e-5, atol=1e-6)


def test_exported_upm_modules_match_reference(tiny_model):
    """The two exportable UPM forms (three chains, stacked experts) vs OneLLM.upm (full last block)."""
    rng = torch.Generator().manual_seed(7)
    h = torch.randn(1, 9, tiny_model.cfg.clip.width, generator=rng)
    pre = oe.PreUPM(tiny_model, "fmri")
    routing = tiny_model.routing_weights("fmri")
    with torch.no_grad():
        expected = tiny_model.upm("fmri", h, full_last_block=True)
        x = pre(h)
        torch.testing.assert_close(oe.UPMExperts(tiny_model)(x, routing), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(oe.UPMExpertsBatched(tiny_model)(x, routing), expected, rtol=1e-5, atol=1e-6)


def test_trunk_moves_cls_without_changing_it(tiny_model):
    """tokenizer graph (pos[0] in row 0) + trunk (adds class_embedding) == tokenize + clip_trunk."""
    x = torch.from_numpy(get_modality("imu").dummy_input(np.random.default_rng(8)))[None]
    with torch.no_grad():
        expected = tiny_model.clip_trunk(tiny_model.tokenize("imu", x))
        got = oe.ClipTrunk(tiny_model)(oe.ModalityTokenizer(tiny_model, "imu")(x))
        plain = oe.ClipTrunk(tiny_model, fusable_attention=False)(oe.ModalityTokenizer(tiny_model, "imu")(x))
    torch.testing.assert_close(plain, expected, rtol=0, atol=0)  # bit-identical with the reference blocks
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_parity_failure_raises(tiny_model, tiny_config, tmp_path, monkeypatch):
    monkeypatch.setitem(oe.PARITY_MIN_COSINE, "fp32", 1.5)  # unreachable: any graph must fail
    with pytest.raises(ParityError, match="below the fp32 floor"):
        job = [j for j in oe.plan_graphs(tiny_model, tiny_config, ["imu"]) if j.name == "post.imu"][0]
        oe._export_one(job, tmp_path, tmp_path, ("fp32",), False, tmp_path, 0)


def test_unknown_precision_and_modality(tiny_model, tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="unknown encoder precision"):
        oe.export_encoder(tiny_model, tiny_config, tmp_path, ["image"], precision="int4")
    with pytest.raises(ConfigError, match="not in config"):
        oe.export_encoder(tiny_model, tiny_config, tmp_path, ["smell"])


def test_fp32_reference_of_a_half_model_is_encoder_only(tiny_config, tiny_model):
    """An fp16 model is exported from an fp32 encoder-only copy; its encode equals the fp32 model's
    (up to the fp16 rounding of the weights)."""
    from onellm.ref.model import OneLLM

    half = OneLLM(tiny_config)
    half.load_state_dict(tiny_model.state_dict())
    half = half.half()
    ref = oe.fp32_reference(half)
    assert ref is not half and len(ref.layers) == 0
    assert all(p.dtype == torch.float32 for p in ref.parameters())
    x = torch.from_numpy(get_modality("imu").dummy_input(np.random.default_rng(9)))[None]
    with torch.no_grad():
        fig = oe.compare(tiny_model.encode("imu", x).numpy(), ref.encode("imu", x).numpy())
    assert fig["cosine"] > 0.999
