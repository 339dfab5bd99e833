"""Regression: quantized GGUFs and llama.cpp's extra CPU weight buffer types.

The crash this guards against (seen with llama-cpp-python 0.3.36 built natively with
GGML_AMX_INT8 on an AMX-capable Intel CPU): a q8_0 or q4_k_m model loaded with
`use_extra_bufts=True` (llama.cpp's default) segfaults on its first llama_decode; f16 does
not. Of the extra buffer types an x86 build can offer, only AMX takes Q8_0 weights
(CPU_REPACK repacks Q4_0/Q4_K/IQ4_NL/MXFP4/Q2_K on x86, never Q8_0) and AMX leaves F16
un-repacked, so AMX is the one at fault (llama.cpp's ggml-cpu repack and AMX sources). The same
crash reproduced on a second AMX machine (Intel Xeon, AMX-INT8/BF16) with this build. Our loader
therefore keeps extra buffer types off by default and never lets llama.cpp pick AMX: where the
CPU offers it, repacking means each tensor CPU_REPACK takes is sent there by a buffer-type
override (`_llama.set_extra_bufts`), with llama.cpp's own switch off.

Every load runs in a subprocess so a segfault fails a test instead of killing pytest.
The model is a width-256 decoder, so Q4_K/Q6_K are really used and rows are multiples
of 8 (the shapes CPU_REPACK and AMX accept).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

PROBE = r"""
import json, sys
import numpy as np
from onellm.runtime import _llama
from onellm.runtime.decoder import Decoder, Sampling
path, mode = sys.argv[1], sys.argv[2]
if mode == "switch":  # llama.cpp's own use_extra_bufts, whatever types the CPU offers (the crashing setting)
    _llama.CRASHING_EXTRA_BUFTS = ()
kw = {} if mode == "default" else {"use_extra_bufts": mode in ("extra", "switch")}
with _llama.capture_native_log() as lines:
    dec = Decoder(path, n_ctx=128, **kw)
bufs = sorted({l.split(":")[1].split()[0] for l in lines if "model buffer size" in l})
s = dec.session()
logits = s.prefill([1, 5, 6, 7, 8, 9, 10, 11])
g = s.generate_text(Sampling.greedy(4), stop=())
print(json.dumps({"extra_types": _llama.cpu_extra_buffer_types(), "weight_buffers": bufs,
                  "extra_on": dec._model.use_extra_bufts, "repacked": dec._model.repacked, "logits": logits[0, :64].tolist(),
                  "tokens": g.tokens}))
"""


@pytest.fixture(scope="module")
def wide_ggufs(tiny_config, tiny_tokenizer, tmp_path_factory):
    from onellm.export.gguf import decoder_keys, export_gguf
    from onellm.ref.model import OneLLM

    dec = dataclasses.replace(tiny_config.decoder, dim=256, n_heads=4, multiple_of=256, max_seq_len=256)
    cfg = dataclasses.replace(tiny_config, name="wide", decoder=dec)
    model = OneLLM(cfg).init_random_(seed=11)
    sd = {k: v for k, v in model.state_dict().items() if k in set(decoder_keys(cfg))}
    out = tmp_path_factory.mktemp("wide")
    return {q: export_gguf(sd, cfg, tiny_tokenizer, out / f"wide-{q}.gguf", quant=q)["path"]
            for q in ("f16", "q8_0", "q4_k_m", "q4_0")}


@functools.lru_cache(maxsize=None)
def _run(path: str, mode: str, env: tuple = ()) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, path, mode], capture_output=True, text=True, timeout=120,
        env={**os.environ, **dict(env)},
    )
    return proc.returncode, proc.stdout, proc.stderr


def _probe(path: str, mode: str, env: dict | None = None) -> tuple[int, dict | None, str]:
    """Load + prefill + 4 greedy tokens in a subprocess: (exit code, probe output, stderr tail)."""
    rc, stdout, stderr = _run(path, mode, tuple(sorted((env or {}).items())))
    out = json.loads(stdout.strip().splitlines()[-1]) if rc == 0 else None
    return rc, out, stderr[-1500:]


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m", "q4_0", "f16"])
def test_default_loader_does_not_crash(quant, wide_ggufs):
    rc, out, err = _probe(wide_ggufs[quant], "default")
    assert rc == 0, f"decoder crashed (rc {rc}, -11 = SIGSEGV) on {quant} with the default loader:\n{err}"
    assert out["extra_on"] is False
    assert not {"AMX", "CPU_REPACK"} & set(out["weight_buffers"]), out["weight_buffers"]
    assert len(out["tokens"]) == 4


def test_env_var_opts_in_to_extra_buffer_types(wide_ggufs):
    rc, out, err = _probe(wide_ggufs["f16"], "default", env={"ONELLM_LLAMA_EXTRA_BUFTS": "1"})
    assert rc == 0, err
    assert out["extra_on"] is True


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m", "q4_0"])
def test_extra_buffer_types_never_crash_and_skip_amx(quant, wide_ggufs):
    """Our loader with extra buffer types on: no crash on any CPU, no AMX buffer, and the 4-bit
    types really repacked by CPU_REPACK wherever the CPU offers it."""
    rc_off, off, err_off = _probe(wide_ggufs[quant], "default")
    assert rc_off == 0, err_off
    rc, out, err = _probe(wide_ggufs[quant], "extra")
    assert rc == 0, f"{quant} with extra buffer types {off['extra_types']} crashed (rc {rc}):\n{err}"
    assert "AMX" not in out["weight_buffers"], out["weight_buffers"]
    if quant in ("q4_k_m", "q4_0") and "CPU_REPACK" in off["extra_types"]:
        assert "CPU_REPACK" in out["weight_buffers"]  # Q4_K / Q4_0 really got repacked
        if "AMX" in off["extra_types"]:
            # by override: the 7 matrices of each of the 2 layers (Q6_K ones of q4_k_m stay plain)
            assert 0 < out["repacked"] <= 14 + 1, out["repacked"]
    if quant == "q8_0":
        # nothing on x86 repacks Q8_0 (with extra types on, the file may be read, not mapped: CPU vs CPU_Mapped)
        assert [b.removesuffix("_Mapped") for b in out["weight_buffers"]] == \
            [b.removesuffix("_Mapped") for b in off["weight_buffers"]]
        assert "CPU_REPACK" not in out["weight_buffers"]
    # repacked or not, the numbers agree to the quantization's own noise
    a, b = off["logits"], out["logits"]
    assert max(abs(x - y) for x, y in zip(a, b)) <= 0.05 * (max(map(abs, a)) + 1e-6)
    assert len(out["tokens"]) == 4


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m", "q4_0"])
def test_llama_cpp_own_switch_with_amx(quant, wide_ggufs):
    """Documents the crashing configuration (llama.cpp's own use_extra_bufts, AMX first);
    passes where this build offers no AMX buffer type, or once llama.cpp fixes it."""
    rc_off, off, err_off = _probe(wide_ggufs[quant], "default")
    assert rc_off == 0, err_off
    rc, out, err = _probe(wide_ggufs[quant], "switch")
    if "AMX" in off["extra_types"] and rc != 0:
        pytest.xfail(f"known llama.cpp crash: {quant} with the AMX extra buffer type (rc {rc})")
    assert rc == 0, f"{quant} with llama.cpp's extra buffer types {off['extra_types']} crashed (rc {rc}):\n{err}"
    a, b = off["logits"], out["logits"]
    assert max(abs(x - y) for x, y in zip(a, b)) <= 0.05 * (max(map(abs, a)) + 1e-6)


def test_repackable_tensors_follow_type_and_shape(wide_ggufs):
    """CPU_REPACK candidates are read from the GGUF header: only 4-bit block matrices of the
    layers (and the output), never the embedding table, never 8-bit or 16-bit weights."""
    from onellm.runtime import _llama

    shapes = _llama.gguf_tensor_shapes(wide_ggufs["q4_0"])
    assert shapes["blk.0.attn_q.weight"] == (2, (256, 256, 1, 1))  # GGML_TYPE_Q4_0, ne
    names = _llama.repackable_tensors(wide_ggufs["q4_0"])
    assert "token_embd.weight" not in names
    assert {f"blk.{i}.{t}.weight" for i in (0, 1) for t in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                             "ffn_gate", "ffn_up", "ffn_down")} <= set(names)
    assert all(shapes[n][0] in (2, 12, 20) for n in names)
    assert _llama.repackable_tensors(wide_ggufs["q8_0"]) == []
    assert _llama.repackable_tensors(wide_ggufs["f16"]) == []
    k = _llama.repackable_tensors(wide_ggufs["q4_k_m"])
    assert k and all(shapes_k[0] == 12 for shapes_k in (_llama.gguf_tensor_shapes(wide_ggufs["q4_k_m"])[n] for n in k))
