"""The PyTorch reference model: checkpoint layout, encoder stages, decoder, dtypes.

The 7B key table below is written from the spec's facts (sections 2-6), not from the
config, so a config or model change that breaks the release's layout fails here.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onellm.ref.config import load_preset  # noqa: E402
from onellm.ref.decoder import apply_rope, rope_tables  # noqa: E402
from onellm.ref.model import OneLLM, count_parameters, init_random_weights  # noqa: E402
from onellm.runtime.errors import ConfigError, InputError  # noqa: E402
from onellm.runtime.modalities import all_modalities, get_modality  # noqa: E402

MODALITIES = list(all_modalities())
RELEASE_MODALITIES = ("image", "video", "audio", "point", "rgbd", "rgbn", "fmri", "imu")


def expected_7b_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the release checkpoint (without `llma.`) and its shape, from the spec."""
    s: dict[str, tuple[int, ...]] = {
        "tok_embeddings.weight": (32000, 4096),
        "output.weight": (32000, 4096),
        "norm.weight": (4096,),
    }

    def llama_block(prefix: str, dim: int, hidden: int) -> None:
        for w in ("wq", "wk", "wv", "wo"):
            s[f"{prefix}.attention.{w}.weight"] = (dim, dim)
        s[f"{prefix}.feed_forward.w1.weight"] = (hidden, dim)
        s[f"{prefix}.feed_forward.w2.weight"] = (dim, hidden)
        s[f"{prefix}.feed_forward.w3.weight"] = (hidden, dim)
        s[f"{prefix}.attention_norm.weight"] = (dim,)
        s[f"{prefix}.ffn_norm.weight"] = (dim,)

    for i in range(32):
        llama_block(f"layers.{i}", 4096, 11008)
    for e in range(3):
        for j in range(8):
            llama_block(f"resample_layers.{e}.{j}", 1024, 2816)
    for m in RELEASE_MODALITIES:
        s[f"routers.{m}.fc1.weight"] = (4096, 1024)
        s[f"routers.{m}.fc1.bias"] = (4096,)
        s[f"routers.{m}.fc2.weight"] = (3, 4096)
        s[f"routers.{m}.fc2.bias"] = (3,)
        s[f"resample_tokens.{m}"] = (1, 30, 1024)
        s[f"clip_proj1.{m}.0.weight"] = (1024, 1024)
        s[f"clip_proj1.{m}.0.bias"] = (1024,)
        s[f"clip_proj1.{m}.1.weight"] = (1024,)
        s[f"clip_proj1.{m}.1.bias"] = (1024,)
        s[f"clip_proj2.{m}.0.weight"] = (4096, 1024)
        s[f"clip_proj2.{m}.0.bias"] = (4096,)
        s[f"clip_proj2.{m}.1.weight"] = (4096,)
        s[f"clip_proj2.{m}.1.bias"] = (4096,)
        s[f"start_tag.{m}"] = (1, 1, 4096)
        s[f"end_tag.{m}"] = (1, 1, 4096)
    s["conv1.audio.weight"] = (1024, 1, 16, 16)
    s["conv1.audio.bias"] = (1024,)
    s["conv1.point.conv1.weight"] = (1024, 6, 1, 1)
    s["conv1.point.conv1.bias"] = (1024,)
    s["conv1.fmri.weight"] = (8192, 15724)
    s["conv1.fmri.bias"] = (8192,)
    s["conv1.imu.weight"] = (1024, 6, 10)
    s["positional_embedding.audio"] = (1213, 1024)
    s["positional_embedding.point"] = (1025, 1024)
    s["positional_embedding.imu"] = (392, 1024)
    s["positional_embedding.fmri"] = (9, 1024)
    v = "clip.visual"
    s[f"{v}.conv1.weight"] = (1024, 3, 14, 14)
    s[f"{v}.class_embedding"] = (1024,)
    s[f"{v}.positional_embedding"] = (257, 1024)
    s[f"{v}.proj"] = (1024, 768)
    for ln in ("ln_pre", "ln_post"):
        s[f"{v}.{ln}.weight"] = (1024,)
        s[f"{v}.{ln}.bias"] = (1024,)
    for k in range(24):
        b = f"{v}.transformer.resblocks.{k}"
        s[f"{b}.attn.in_proj_weight"] = (3072, 1024)
        s[f"{b}.attn.in_proj_bias"] = (3072,)
        s[f"{b}.attn.out_proj.weight"] = (1024, 1024)
        s[f"{b}.attn.out_proj.bias"] = (1024,)
        for ln in ("ln_1", "ln_2"):
            s[f"{b}.{ln}.weight"] = (1024,)
            s[f"{b}.{ln}.bias"] = (1024,)
        s[f"{b}.mlp.c_fc.weight"] = (4096, 1024)
        s[f"{b}.mlp.c_fc.bias"] = (4096,)
        s[f"{b}.mlp.c_proj.weight"] = (1024, 4096)
        s[f"{b}.mlp.c_proj.bias"] = (1024,)
    return s


@pytest.fixture(scope="module")
def meta_7b():
    with torch.device("meta"):
        return OneLLM(load_preset("7b"))


def test_7b_state_dict_is_the_release_layout(meta_7b):
    got = {k: tuple(v.shape) for k, v in meta_7b.state_dict().items()}
    want = expected_7b_shapes()
    assert sorted(set(got) - set(want)) == [], "keys the release does not have"
    assert sorted(set(want) - set(got)) == [], "release keys the model lacks"
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert wrong == {}
    assert all(v.is_meta for v in meta_7b.state_dict().values())


def test_7b_loads_a_state_dict_strictly_with_assign(meta_7b):
    # the loader's path: meta model, then assign real tensors (tiny here, same code)
    cfg = load_preset("tiny")
    source = OneLLM(cfg)
    init_random_weights(source, seed=5)
    with torch.device("meta"):
        model = OneLLM(cfg)
    model.load_state_dict(source.state_dict(), strict=True, assign=True)
    model.eval()
    ids = torch.tensor([[1, 5, 9, 11]])
    torch.testing.assert_close(model(ids), source.eval()(ids), rtol=0, atol=0)


def test_7b_parameter_count_split():
    counts = count_parameters(load_preset("7b"))
    assert counts["decoder"] == 6_738_415_616  # LLaMA-2-7B
    # per block: 4 * 1024^2 attention + 3 * 1024 * 2816 SwiGLU + 2 * 1024 norms; 3 experts x 8 blocks
    assert counts["upm_experts"] == 24 * (4 * 1024 * 1024 + 3 * 1024 * 2816 + 2 * 1024) == 308_330_496
    per_modality = (1024 * 4096 + 4096 + 4096 * 3 + 3) + 30 * 1024 + (1024 * 1024 + 3 * 1024) + (
        1024 * 4096 + 3 * 4096
    ) + 2 * 4096
    assert counts["upm_per_modality"] == {m: per_modality for m in RELEASE_MODALITIES}
    assert counts["tokenizers"]["fmri"] == 15724 * 8192 + 8192 + 9 * 1024
    assert counts["tokenizers"]["image"] == 0
    assert counts["clip"] == 303_179_776 and counts["clip_unused_proj"] == 1024 * 768
    parts = (
        counts["decoder"] + counts["clip"] + counts["clip_unused_proj"] + counts["upm"]
        + sum(counts["tokenizers"].values())
    )
    assert parts == counts["total"]


def test_partial_config_builds_only_its_modalities():
    import dataclasses

    cfg = dataclasses.replace(load_preset("tiny"), modalities=("imu", "image"))
    with torch.device("meta"):
        model = OneLLM(cfg)
    keys = model.state_dict().keys()
    assert not any(".audio" in k or k.endswith(".point") for k in keys)
    assert "conv1.imu.weight" in keys and "resample_tokens.image" in keys
    with pytest.raises(ConfigError, match="no parameters for modality 'audio'"):
        model.input_shape("audio")
    with pytest.raises(ConfigError, match="known modalities"):
        model.input_shape("smell")


# --------------------------------------------------------------------------- tiny encoder


def _dummy(name: str, batch: int = 1, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    spec = get_modality(name)
    return torch.from_numpy(np.stack([spec.dummy_input(rng) for _ in range(batch)]))


@pytest.mark.parametrize("name", MODALITIES)
def test_tiny_encoder_stage_shapes(tiny_model, tiny_config, name):
    spec = get_modality(name)
    width, dim = tiny_config.clip.width, tiny_config.decoder.dim
    x = _dummy(name)
    assert tuple(x.shape[1:]) == tiny_model.input_shape(name) == spec.input_shape
    with torch.inference_mode():
        tokens = tiny_model.tokenize(name, x)
        assert tokens.shape == (spec.n_frames, spec.n_tokens, width)
        feats = tiny_model.clip_trunk(tokens)
        assert feats.shape == tokens.shape
        mean = tiny_model.mean_frames(feats, 1)
        assert mean.shape == (1, spec.n_tokens, width)
        resampled = tiny_model.upm(name, mean)
        assert resampled.shape == (1, 30, width)
        block = tiny_model.project(name, resampled)
        assert block.shape == (1, 32, dim)
        torch.testing.assert_close(tiny_model.encode(name, x), block, rtol=0, atol=0)
        assert torch.equal(block[0, 0], tiny_model.start_tag[name][0, 0])
        assert torch.equal(block[0, -1], tiny_model.end_tag[name][0, 0])
        assert torch.isfinite(block).all()


@pytest.mark.parametrize("name", ["imu", "fmri"])
def test_tiny_encoder_batch_rows_are_independent(tiny_model, name):
    x = _dummy(name, batch=2, seed=3)
    with torch.inference_mode():
        both = tiny_model.encode(name, x)
        one = tiny_model.encode(name, x[1:])
    torch.testing.assert_close(both[1:], one, rtol=1e-5, atol=1e-5)
    assert (both[0, 1:31] - both[1, 1:31]).abs().max() > 1e-3  # different inputs, different rows


def test_routing_weights_are_normalised_constants(tiny_model, tiny_config):
    for name in tiny_config.modalities:
        w = tiny_model.routing_weights(name)
        assert w.shape == (30, 3)
        assert (w > 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(30), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["image", "imu"])
def test_upm_equals_upstream_formulation(tiny_model, name):
    """Router over every row, all rows through every block, then the first 30: same result."""
    x = _dummy(name, seed=1)
    with torch.inference_mode():
        feats = tiny_model.mean_frames(tiny_model.clip_trunk(tiny_model.tokenize(name, x)), 1)
        h = tiny_model.clip_proj1[name](feats)
        seq = torch.cat([tiny_model.resample_tokens[name], h], dim=1)
        rw = torch.sigmoid(tiny_model.routers[name](seq))
        rw = rw / rw.sum(-1, keepdim=True)
        want = 0
        for e, blocks in tiny_model.resample_layers.items():
            y = seq
            for block in blocks:
                y = block(y)  # every row, no rope, no mask
            want = want + y[:, :30] * rw[:, :30, int(e), None]
        fast = tiny_model.upm(name, feats)  # last block computes 30 rows only
        full = tiny_model.upm(name, feats, full_last_block=True)
    torch.testing.assert_close(fast, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-5)
    # and the rows past 30 do matter through the earlier blocks' attention
    with torch.inference_mode():
        other = tiny_model.upm(name, feats + 0.5)
    assert (other - fast).abs().max() > 1e-3


def test_video_is_a_frame_mean_after_the_trunk(tiny_model):
    x = _dummy("video", seed=2)
    with torch.inference_mode():
        feats = tiny_model.clip_trunk(tiny_model.tokenize("video", x))  # [15, 257, w]
        per_frame = torch.stack([tiny_model.clip_trunk(tiny_model.tokenize("image", x[:, t]))[0] for t in range(15)])
        torch.testing.assert_close(feats, per_frame, rtol=1e-5, atol=1e-5)
        mean = tiny_model.mean_frames(feats, 1)
        torch.testing.assert_close(mean[0], per_frame.mean(0), rtol=1e-5, atol=1e-6)
        want = tiny_model.project("video", tiny_model.upm("video", mean))
        torch.testing.assert_close(tiny_model.encode("video", x), want, rtol=1e-5, atol=1e-6)
        # a video of one repeated frame has that frame's CLIP features
        same = x[:, :1].expand(-1, 15, -1, -1, -1)
        rep = tiny_model.mean_frames(tiny_model.clip_trunk(tiny_model.tokenize("video", same)), 1)
        torch.testing.assert_close(rep, per_frame[:1], rtol=1e-5, atol=1e-5)


def test_fmri_token_layout(tiny_model, tiny_config):
    """Linear output reshaped [width, 8]: token t of channel c is out[c*8 + t]."""
    x = _dummy("fmri")
    width = tiny_config.clip.width
    with torch.inference_mode():
        out = tiny_model.conv1["fmri"](x)[0, 0]  # [width * 8]
        tokens = tiny_model.tokenize("fmri", x)[0]
        visual = tiny_model.clip.visual
        raw = out.view(width, 8).T  # [8, width]
        want = torch.cat([visual.class_embedding[None], raw]) + tiny_model.positional_embedding["fmri"]
        torch.testing.assert_close(tokens, visual.ln_pre(want), rtol=1e-5, atol=1e-5)


def test_audio_grid_is_row_major(tiny_model, tiny_config):
    x = _dummy("audio")
    with torch.inference_mode():
        grid = tiny_model.conv1["audio"](x)  # [1, width, 12, 101]
        assert grid.shape[2:] == (12, 101)
        tokens = tiny_model.tokenize("audio", x)[0]
        visual = tiny_model.clip.visual
        raw = grid[0].permute(1, 2, 0).reshape(12 * 101, -1)  # (row, col) order
        want = torch.cat([visual.class_embedding[None], raw]) + tiny_model.positional_embedding["audio"]
        torch.testing.assert_close(tokens, visual.ln_pre(want), rtol=1e-5, atol=1e-5)


def test_bad_input_shapes_raise_input_error(tiny_model):
    with pytest.raises(InputError, match=r"imu input: expected a tensor of shape \[B, 6, 400\]"):
        tiny_model.encode("imu", torch.zeros(1, 6, 399))
    with pytest.raises(InputError):
        tiny_model.encode("video", torch.zeros(1, 3, 224, 224))


# --------------------------------------------------------------------------- decoder


def test_rope_equals_meta_complex_formulation():
    head_dim, theta = 16, 10000.0
    x = torch.randn(2, 7, 3, head_dim, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_tables(head_dim, 7, theta)
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    freqs_cis = torch.polar(torch.ones(7, head_dim // 2), torch.outer(torch.arange(7).float(), freqs))
    xc = torch.view_as_complex(x.reshape(2, 7, 3, -1, 2))
    want = torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)
    torch.testing.assert_close(apply_rope(x, cos, sin), want, rtol=1e-6, atol=1e-6)


def test_chunked_prefill_with_cache_equals_one_pass(tiny_model, tiny_config):
    ids = torch.randint(3, tiny_config.decoder.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        h = tiny_model.embed_tokens(ids)
        full = tiny_model.forward_decoder(h, 0)
        cache = tiny_model.new_cache(batch_size=2, max_seq_len=64)
        parts = [tiny_model.forward_decoder(h[:, a:b], a, cache) for a, b in ((0, 7), (7, 8), (8, 20))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 20
    assert full.dtype == torch.float32 and full.shape == (2, 20, tiny_config.decoder.vocab_size)


def test_decoder_positions_are_checked(tiny_model, tiny_config):
    n = tiny_config.decoder.max_seq_len
    with torch.inference_mode():
        cache = tiny_model.new_cache(max_seq_len=8)
        h = tiny_model.embed_tokens(torch.tensor([[1, 2, 3]]))
        tiny_model.forward_decoder(h, 0, cache)
        with pytest.raises(InputError, match="at most 8 positions"):
            tiny_model.forward_decoder(torch.cat([h, h], dim=1), 3, cache)  # 3 + 6 > 8
        with pytest.raises(InputError, match="start_pos"):
            tiny_model.forward_decoder(h[:, :1], 5, cache)  # a gap after position 3
        with pytest.raises(InputError, match=f"at most {n} positions"):
            tiny_model.forward_decoder(h, n - 1)


def test_random_init_is_seeded_and_not_degenerate(tiny_config):
    a = OneLLM(tiny_config)
    b = OneLLM(tiny_config)
    init_random_weights(a, seed=7)
    init_random_weights(b, seed=7)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert torch.equal(a.norm.weight, torch.ones_like(a.norm.weight))
    assert torch.equal(a.clip.visual.ln_post.bias, torch.zeros_like(a.clip.visual.ln_post.bias))
    assert abs(float(a.output.weight.detach().std()) - 0.02) < 0.002
    with torch.inference_mode():
        logits = a.eval()(torch.tensor([[1, 40, 41, 42, 43, 44]]))[0]
    assert logits.std(dim=-1).min() > 0.05  # varied over the vocabulary
    assert len(set(logits.argmax(-1).tolist())) > 1  # and over positions


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward_tracks_fp32(tiny_config, dtype):
    model = OneLLM(tiny_config)
    init_random_weights(model, seed=3)
    model.eval()
    x_img, x_pt = _dummy("image"), _dummy("point")
    ids = torch.tensor([[1, 7, 8, 9]])
    with_point = dtype == torch.bfloat16  # the point tokenizer runs in fp32 anyway; one dtype suffices
    with torch.inference_mode():
        ref_img = model.encode("image", x_img)
        ref_pt = model.encode("point", x_pt) if with_point else None
        ref_logits = model(ids, ref_img)
        low = model.to(dtype)
        img = low.encode("image", x_img)
        pt = low.encode("point", x_pt) if with_point else None
        logits = low(ids, img)
    assert img.dtype == dtype and logits.dtype == torch.float32
    pairs = [(img, ref_img), (logits, ref_logits)] + ([(pt, ref_pt)] if with_point else [])
    for got, want in pairs:
        err = (got.float() - want).abs().max() / want.abs().max()
        assert err < 0.05, float(err)
