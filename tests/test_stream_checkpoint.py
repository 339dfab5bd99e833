"""The streamed random checkpoint (the 7b bench's synthesis) and the low-memory export path.

A small config stands in for 7B: the streamed file must load to exactly the tensors the
in-RAM `save_random_checkpoint` writes, twice the same, and its writer's peak RSS must
stay near one tensor, not grow with the checkpoint (measured in a fresh subprocess from
/proc/self/status VmHWM; no timing). The low-memory decoder reference must equal the
fp32 model's logits.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from onellm.ref.checkpoint import load_model
from onellm.ref.config import load_preset
from onellm.ref.lowmem import decoder_is_fp32, decoder_logits_fp32
from onellm.ref.testing import save_random_checkpoint, stream_random_checkpoint


def _sd(path):
    return torch.load(path, mmap=True, weights_only=True)


def test_streamed_equals_in_ram_and_is_deterministic(tmp_path):
    cfg = load_preset("tiny")
    a = stream_random_checkpoint(cfg, tmp_path / "a.pth", seed=7)
    b = stream_random_checkpoint(cfg, tmp_path / "b.pth", seed=7)
    c = save_random_checkpoint(cfg, tmp_path / "c.pth", seed=7, dtype="fp16")[0]
    other = stream_random_checkpoint(cfg, tmp_path / "d.pth", seed=8)
    sa, sb, sc, sd = _sd(a), _sd(b), _sd(c), _sd(other)
    assert list(sa) == list(sc) and len(sa) > 100
    for key in sc:
        assert sa[key].dtype == torch.float16
        assert torch.equal(sa[key], sc[key]), key
        assert torch.equal(sa[key], sb[key]), key
    drawn = [k for k in sc if not k.endswith(("norm.weight", "ln_1.weight"))][0]
    assert not torch.equal(sa[drawn], sd[drawn])  # the seed matters
    assert not (tmp_path / "a.pth.partial").exists()
    assert a.read_bytes() == b.read_bytes()


def test_streamed_keeps_only_asked_modalities(tmp_path):
    cfg = load_preset("tiny")
    keys = list(_sd(stream_random_checkpoint(cfg, tmp_path / "a.pth", seed=1, modalities=("imu",))))
    ref = list(_sd(save_random_checkpoint(cfg, tmp_path / "b.pth", seed=1, dtype="fp16", modalities=("imu",))[0]))
    assert keys == ref
    assert not any(".audio." in k for k in keys) and any(".imu." in k for k in keys)
    # the kept tensors are drawn from the same stream as the full checkpoint's
    full = _sd(stream_random_checkpoint(cfg, tmp_path / "c.pth", seed=1))
    part = _sd(tmp_path / "a.pth")
    assert all(torch.equal(part[k], full[k]) for k in keys)


_PEAK = textwrap.dedent("""
    import dataclasses, json, sys
    from onellm.ref.config import load_preset
    from onellm.ref.testing import stream_random_checkpoint
    import torch

    def hwm():
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmHWM:"))

    cfg = load_preset("tiny")
    d = cfg.decoder  # wider than tiny's, so that the layers, not CLIP, make the file's size
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(d, dim=512, n_heads=8, n_layers=int(sys.argv[2])))
    torch.ones(1)  # torch's own start-up allocations before the baseline
    base = hwm()
    stream_random_checkpoint(cfg, sys.argv[1], seed=0)
    print(json.dumps({"base": base, "peak": hwm()}))
""")


def _peak(tmp_path, n_layers: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / f"l{n_layers}.pth"), str(n_layers)],
                         capture_output=True, text=True, check=True, timeout=240)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["size"] = (tmp_path / f"l{n_layers}.pth").stat().st_size
    return res


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_streamed_peak_rss_does_not_grow_with_the_checkpoint(tmp_path):
    # a tiny config with a decoder made wide and deep enough that the file dwarfs one tensor
    small, big = _peak(tmp_path, 2), _peak(tmp_path, 64)
    grown = big["size"] - small["size"]
    assert grown > 300 * 2**20  # 62 more 512-wide layers: ~7 MB each
    # the larger file costs no more than a few tensors' worth of extra peak, far from its size
    extra = (big["peak"] - big["base"]) - (small["peak"] - small["base"])
    assert extra < 0.1 * grown, (small, big)


def test_low_memory_reference_equals_fp32_model(tmp_path):
    from onellm.export.gguf import reference_logits

    cfg = load_preset("tiny")
    ckpt = stream_random_checkpoint(cfg, tmp_path / "m.pth", seed=3)
    m16, report = load_model(cfg, ckpt, dtype="fp16")
    m32, _ = load_model(cfg, ckpt, dtype="fp32")
    assert report.cast_tensors == 0 and not decoder_is_fp32(m16) and decoder_is_fp32(m32)
    gen = torch.Generator().manual_seed(0)
    block = torch.randn(1, cfg.n_inserted, cfg.decoder.dim, generator=gen)
    ids = torch.tensor([[1, 17, 42, 99, 5]])
    got = decoder_logits_fp32(m16, ids, block)
    with torch.no_grad():
        h = m32.build_sequence(ids, block)
        want = m32.forward_decoder(h, 0, m32.new_cache(1, h.shape[1]))
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # the fp16 weights are back in place afterwards, still the memory-mapped file's
    assert all(p.dtype == torch.float16 for p in m16.layers.parameters())
    # the export's entry point takes the layer-wise path for such a model, releasing pages as it goes
    import numpy as np

    text = [17, 42, 99, 5]
    r16 = reference_logits(m16, cfg, 1, block[0].numpy(), text, release_files=report.files)
    r32 = reference_logits(m32, cfg, 1, block[0].numpy(), text)
    np.testing.assert_allclose(r16, r32, rtol=1e-5, atol=1e-5 * float(np.abs(r32).max()))


def test_low_memory_export_validates_gguf_against_the_layerwise_reference(tmp_path, tiny_tokenizer):
    import shutil

    from onellm.export.bundle import export_decoders

    cfg = load_preset("tiny")
    ckpt = stream_random_checkpoint(cfg, tmp_path / "m.pth", seed=4)
    model, report = load_model(cfg, ckpt, dtype="fp16")
    shutil.copyfile(tiny_tokenizer, tmp_path / "tokenizer.model")
    out = export_decoders(model, cfg, ckpt, tmp_path, ["f16"], probe="imu", release_files=report.files)
    parity = out["f16"].parity
    # an f16 GGUF of fp16 weights: the same numbers, so the fp32 reference agrees to f16 KV-cache noise
    assert parity["cos_min"] > 0.9995 and parity["top1"] >= 0.95 and parity["positions"] > 32
    assert (tmp_path / "decoder-f16.gguf").is_file()
    assert all(p.dtype == torch.float16 for p in model.layers.parameters())  # never cast in place


def test_low_memory_is_chosen_by_model_size(monkeypatch):
    import os

    from onellm.export.bundle import fp32_exceeds_half_ram

    ram = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 24 * 2**30 // 4096}
    monkeypatch.setattr(os, "sysconf", lambda name: ram[name])
    assert fp32_exceeds_half_ram(load_preset("7b")) and not fp32_exceeds_half_ram(load_preset("bench"))
    ram["SC_PHYS_PAGES"] = 128 * 2**30 // 4096  # a 128 GiB machine loads 7B in fp32
    assert not fp32_exceeds_half_ram(load_preset("7b"))
