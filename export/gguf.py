"""Export the LLaMA decoder of a OneLLM checkpoint as a GGUF file llama.cpp loads standalone.

In:  the checkpoint's tensors (a mapping, normally memory-mapped by
     `onellm.ref.checkpoint.open_checkpoint`, keys without the `llma.` prefix), the
     `ModelConfig`, and the SentencePiece `tokenizer.model`.
Out: one `.gguf`: architecture `llama` in Meta layout, the vocabulary with scores and
     token types (byte tokens included), bos/eos/unk ids, the `v1` chat template, and
     the decoder weights as f32, f16, q8_0 or q4_k_m.

Only the decoder keys are read (`tok_embeddings`, `layers.*`, `norm`, `output`).
Meta's wq/wk rotate interleaved pairs, which is llama.cpp's normal rope mode, so they
are written unpermuted (converters from the Hugging Face layout permute; we must not);
`validate_gguf` proves it by logits parity against the PyTorch reference.

f32/f16 are written tensor by tensor with gguf-py's `GGUFWriter` (tensor infos first,
then header -> kv -> tensor infos -> one tensor's data at a time), so peak memory is
one converted tensor, not the model. q8_0/q4_k_m are produced by llama.cpp's own
quantizer (`llama_model_quantize`) from an intermediate f16 file (f32 when the
checkpoint is not fp16) that is deleted afterwards.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onellm.runtime import prompt as prompt_mod
from onellm.runtime.bundle import sha256_file
from onellm.runtime.errors import CheckpointError, ConfigError, ParityError
from onellm.runtime.registry import DECODER_QUANTS

log = logging.getLogger(__name__)

QUANTS = tuple(DECODER_QUANTS)  # the registry's quantizations, in order
Progress = Callable[[int, int, str], None]  # (tensors done, tensors total, what)


def _gguf():
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - the export extra is missing
        raise ConfigError(f"writing GGUF needs gguf-py (pip install 'onellm[export]'): {exc}") from None
    return gguf


# --------------------------------------------------------------------------- names


def decoder_keys(cfg) -> list[str]:
    """The checkpoint keys of the decoder, in the order they are written."""
    keys = ["tok_embeddings.weight"]
    for i in range(cfg.decoder.n_layers):
        p = f"layers.{i}."
        keys += [
            p + "attention_norm.weight",
            p + "attention.wq.weight",
            p + "attention.wk.weight",
            p + "attention.wv.weight",
            p + "attention.wo.weight",
            p + "ffn_norm.weight",
            p + "feed_forward.w1.weight",
            p + "feed_forward.w2.weight",
            p + "feed_forward.w3.weight",
        ]
    keys += ["norm.weight", "output.weight"]
    return keys


def gguf_tensor_names(cfg) -> dict[str, str]:
    """checkpoint key -> GGUF tensor name, from gguf-py's llama-pth name table."""
    gguf = _gguf()
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.decoder.n_layers)
    names = {}
    for key in decoder_keys(cfg):
        name = tmap.get_name(key, try_suffixes=(".weight",))
        assert name is not None, f"gguf-py has no llama tensor for {key}"
        names[key] = name
    return names


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    d = cfg.decoder
    shapes = {"tok_embeddings.weight": (d.vocab_size, d.dim), "norm.weight": (d.dim,),
              "output.weight": (d.vocab_size, d.dim)}
    for i in range(d.n_layers):
        p = f"layers.{i}."
        for w in ("wq", "wk", "wv", "wo"):
            shapes[p + f"attention.{w}.weight"] = (d.dim, d.dim)
        shapes[p + "feed_forward.w1.weight"] = (d.ffn_hidden, d.dim)
        shapes[p + "feed_forward.w3.weight"] = (d.ffn_hidden, d.dim)
        shapes[p + "feed_forward.w2.weight"] = (d.dim, d.ffn_hidden)
        shapes[p + "attention_norm.weight"] = (d.dim,)
        shapes[p + "ffn_norm.weight"] = (d.dim,)
    return shapes


def check_decoder_tensors(tensors: Mapping[str, Any], cfg) -> None:
    """Raise one CheckpointError listing missing or mis-shaped decoder tensors."""
    shapes = expected_shapes(cfg)
    missing = [k for k in shapes if k not in tensors]
    wrong = [
        f"{k} {list(tensors[k].shape)} vs config {list(s)}"
        for k, s in shapes.items() if k in tensors and tuple(tensors[k].shape) != s
    ]
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} decoder tensors missing (e.g. {', '.join(missing[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} with wrong shape ({'; '.join(wrong[:3])})")
        raise CheckpointError(f"checkpoint does not match config {cfg.name!r}: " + "; ".join(parts))


# --------------------------------------------------------------------------- vocabulary


def chat_template() -> str:
    """The `v1` conversation as a Jinja chat template (BOS is added by the tokenizer, not here)."""
    human, assistant = prompt_mod.ROLES
    sep = prompt_mod.SEP
    system = prompt_mod.SYSTEM.replace("'", "\\'")
    return (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{{ messages[0]['content'] }}{% set loop_messages = messages[1:] %}"
        f"{{% else %}}{{{{ '{system}' }}}}{{% set loop_messages = messages %}}{{% endif %}}"
        f"{{{{ '\\n\\n{sep}' }}}}"
        "{% for message in loop_messages %}"
        f"{{% if message['role'] == 'user' %}}{{{{ '{human}: ' + message['content'] + '\\n{sep}' }}}}"
        f"{{% elif message['role'] == 'assistant' %}}{{{{ '{assistant}: ' + message['content'] + '\\n{sep}' }}}}"
        "{% endif %}{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ '{assistant}:' }}}}{{% endif %}}"
    )


def read_sentencepiece(tokenizer_path: str | os.PathLike, vocab_size: int) -> dict[str, Any]:
    """Pieces, scores and GGUF token types of a SentencePiece model, padded to vocab_size."""
    gguf = _gguf()
    import sentencepiece as spm

    path = Path(tokenizer_path)
    if not path.is_file():
        raise ConfigError(f"{path}: tokenizer file not found (expected a SentencePiece tokenizer.model)")
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as exc:
        raise ConfigError(f"{path}: expected a SentencePiece model, could not load it ({exc})") from None
    n = sp.vocab_size()
    if n > vocab_size:
        raise ConfigError(f"{path}: tokenizer has {n} pieces but the decoder config has vocab_size {vocab_size}")
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(float(sp.GetScore(i)))
        if sp.IsUnknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            t = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            t = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            t = gguf.TokenType.BYTE
        else:
            t = gguf.TokenType.NORMAL
        types.append(int(t))
    for i in range(n, vocab_size):  # embedding rows beyond the tokenizer: never produced by it
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    if sp.bos_id() < 0 or sp.eos_id() < 0:
        raise ConfigError(f"{path}: tokenizer defines no BOS/EOS pieces (bos {sp.bos_id()}, eos {sp.eos_id()})")
    return {
        "tokens": tokens, "scores": scores, "types": types, "n_pieces": n,
        "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(),
        "n_byte": sum(t == int(gguf.TokenType.BYTE) for t in types),
    }


# --------------------------------------------------------------------------- writing


def _as_numpy(t, dtype: np.dtype) -> np.ndarray:
    """One tensor as a C-contiguous numpy array of dtype (a view when no cast is needed)."""
    import torch

    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t, dtype=dtype)
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    arr = t.numpy() if t.device.type == "cpu" else t.cpu().numpy()
    return np.ascontiguousarray(arr, dtype=dtype)


def write_gguf(
    tensors: Mapping[str, Any],
    cfg,
    tokenizer_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    dtype: str = "f16",
    progress: Progress | None = None,
    total_steps: int | None = None,
    release: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Write an f32 or f16 GGUF, streaming one tensor at a time. Returns what it wrote.

    `release(tensor)` is called on each source tensor once written (the export drops the
    checkpoint's file pages with it, so a 7B export's RSS does not grow by the whole file)."""
    gguf = _gguf()
    if dtype not in ("f32", "f16"):
        raise ValueError(f"write_gguf writes f32 or f16, not {dtype!r}")
    d = cfg.decoder
    check_decoder_tensors(tensors, cfg)
    vocab = read_sentencepiece(tokenizer_path, d.vocab_size)
    names = gguf_tensor_names(cfg)
    ftype = gguf.LlamaFileType[DECODER_QUANTS[dtype].gguf_ftype]

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(f"OneLLM {cfg.name} decoder")
    writer.add_vocab_size(d.vocab_size)
    writer.add_context_length(d.max_seq_len)
    writer.add_embedding_length(d.dim)
    writer.add_block_count(d.n_layers)
    writer.add_feed_forward_length(d.ffn_hidden)
    writer.add_head_count(d.n_heads)
    writer.add_head_count_kv(d.n_heads)
    writer.add_rope_dimension_count(d.head_dim)
    writer.add_rope_freq_base(d.rope_theta)
    writer.add_layer_norm_rms_eps(d.norm_eps)
    writer.add_file_type(int(ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["types"])
    writer.add_bos_token_id(vocab["bos"])
    writer.add_eos_token_id(vocab["eos"])
    if vocab["unk"] >= 0:
        writer.add_unk_token_id(vocab["unk"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template())

    keys = decoder_keys(cfg)
    plan = []
    for key in keys:
        shape = tuple(tensors[key].shape)
        # norms (1-D) stay f32 in every file type, as llama.cpp's converters write them
        np_dtype = np.dtype(np.float32) if dtype == "f32" or len(shape) == 1 else np.dtype(np.float16)
        nbytes = int(np.prod(shape)) * np_dtype.itemsize
        writer.add_tensor_info(names[key], shape, np_dtype, nbytes)
        plan.append((key, np_dtype))

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".partial")
    total = total_steps or len(plan)
    n_params = 0
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, (key, np_dtype) in enumerate(plan):
            src = tensors[key]
            arr = _as_numpy(src, np_dtype)
            n_params += arr.size
            writer.write_tensor_data(arr)
            del arr
            if release is not None:
                release(src)
            if progress is not None:
                progress(i + 1, total, names[key])
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {
        "path": str(out_path), "file_type": int(ftype), "n_tensors": len(plan), "n_params": n_params,
        "vocab_size": d.vocab_size, "tokenizer_pieces": vocab["n_pieces"], "byte_tokens": vocab["n_byte"],
        "bos_id": vocab["bos"], "eos_id": vocab["eos"], "unk_id": vocab["unk"],
    }


def _source_is_fp16(tensors: Mapping[str, Any], cfg) -> bool:
    import torch

    return all(getattr(tensors[k], "dtype", None) == torch.float16 for k in decoder_keys(cfg) if k.endswith("w1.weight"))


def export_gguf(
    checkpoint_tensors: Mapping[str, Any],
    cfg,
    tokenizer_path: str | os.PathLike,
    out_path: str | os.PathLike,
    quant: str = "f16",
    progress: Progress | None = None,
    n_threads: int | None = None,
    release: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Write the decoder as `quant` (a name in runtime.registry.DECODER_QUANTS) to out_path; returns an info dict.

    `progress(done, total, what)` is called after each tensor (and once more after the
    quantizer for q8_0/q4_k_m). The info dict holds path, quant, file_type, bytes,
    sha256, n_params, n_ctx, n_embd, vocab_size, bos/eos/unk ids, chat_template, seconds.
    """
    if quant not in DECODER_QUANTS:
        raise ConfigError(f"unknown GGUF quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    spec = DECODER_QUANTS[quant]
    t0 = time.perf_counter()
    out_path = Path(out_path)
    n_steps = len(decoder_keys(cfg)) + (0 if spec.written_directly else 1)
    if spec.written_directly:
        info = write_gguf(checkpoint_tensors, cfg, tokenizer_path, out_path, dtype=quant,
                          progress=progress, total_steps=n_steps, release=release)
        info["intermediate"] = None
    else:
        from onellm.runtime.decoder import quantize_model

        inter = "f16" if _source_is_fp16(checkpoint_tensors, cfg) else "f32"
        tmp = out_path.with_name(f".{out_path.name}.{inter}.gguf")
        try:
            info = write_gguf(checkpoint_tensors, cfg, tokenizer_path, tmp, dtype=inter,
                              progress=progress, total_steps=n_steps, release=release)
            log.info("quantizing %s -> %s with llama.cpp", inter, quant)
            quantize_model(tmp, out_path, quant, n_threads=n_threads)
        finally:
            tmp.unlink(missing_ok=True)
        if progress is not None:
            progress(n_steps, n_steps, f"quantize {inter} -> {quant}")
        info.update(path=str(out_path), file_type=int(_gguf().LlamaFileType[spec.gguf_ftype]), intermediate=inter)
    d = cfg.decoder
    info.update(
        quant=quant, bytes=out_path.stat().st_size, sha256=sha256_file(out_path), n_ctx=d.max_seq_len,
        n_embd=d.dim, chat_template=chat_template(), seconds=round(time.perf_counter() - t0, 3),
    )
    log.info("wrote %s (%s, %.1f MiB) in %.1fs", out_path, quant, info["bytes"] / 2**20, info["seconds"])
    return info


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The key/values and tensor names/types of a GGUF file (gguf-py's reader), for checks."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    kv: dict[str, Any] = {}
    for field in reader.fields.values():
        kv[field.name] = field.contents()
    tensors = {t.name: (t.tensor_type.name, [int(x) for x in t.shape]) for t in reader.tensors}
    return {"kv": kv, "tensors": tensors}


# --------------------------------------------------------------------------- validation

# Tolerances of `validate_gguf`, per file type (from runtime.registry.DECODER_QUANTS). `rel` bounds max|logit diff| / std(reference logits) over
# every position; `cos` is the minimum per-position cosine; `top1` the fraction of
# positions whose argmax agrees.
TOLERANCES = {q.name: dict(q.tolerance) for q in DECODER_QUANTS.values()}


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Parity figures of two [positions, vocab] logit arrays."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    diff = np.abs(ref - got)
    cos = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1) + 1e-30)
    return {
        "max_abs": float(diff.max()),
        "rel": float(diff.max() / (ref.std() + 1e-30)),
        "cos_min": float(cos.min()),
        "top1": float((ref.argmax(-1) == got.argmax(-1)).mean()),
        "positions": int(ref.shape[0]),
    }


def reference_logits(model, cfg, bos: int, block: np.ndarray | None, text_ids: list[int],
                     release_files: Sequence[str] = ()) -> np.ndarray:
    """Torch reference logits at every position of [BOS, block rows, text tokens].

    A model whose decoder is not fp32 (the export's low-memory mode loads the checkpoint
    as stored, memory-mapped) runs layer by layer in fp32 (`onellm.ref.lowmem`), dropping
    the pages of `release_files` it read: the same fp32 reference without a fp32 copy."""
    import torch

    from onellm.ref.lowmem import decoder_is_fp32, decoder_logits_fp32, page_releaser

    with torch.no_grad():
        ids = torch.tensor([[bos, *text_ids]], dtype=torch.long)
        blk = None if block is None else torch.from_numpy(np.asarray(block, dtype=np.float32))[None]
        if not decoder_is_fp32(model):
            release = page_releaser(release_files) if release_files else None
            return decoder_logits_fp32(model, ids, blk, release)[0].numpy()
        h = model.build_sequence(ids, blk)
        cache = model.new_cache(batch_size=1, max_seq_len=h.shape[1])
        return model.forward_decoder(h, 0, cache)[0].float().numpy()


def validate_gguf(
    model,
    cfg,
    gguf_path: str | os.PathLike,
    quant: str,
    *,
    block: np.ndarray | None = None,
    n_text: int = 24,
    seed: int = 0,
    tolerances: Mapping[str, float] | None = None,
    n_threads: int | None = None,
    release_files: Sequence[str] = (),
) -> dict[str, float]:
    """Compare llama.cpp's logits with the reference on BOS + a 32-row block + text.

    `block`: the rows to inject ([n_inserted, dim] float32), e.g. a real encoder output;
    default random unit-variance rows (the scale of clip_proj2's LayerNorm output). The
    text is random token ids. Raises ParityError beyond the tolerance of `quant`
    (`TOLERANCES`, overridable per key); returns the figures.
    """
    from onellm.runtime.decoder import Decoder

    rng = np.random.default_rng(seed)
    d = cfg.decoder
    if block is None:
        block = rng.standard_normal((cfg.n_inserted, d.dim)).astype(np.float32)
    block = np.ascontiguousarray(block, dtype=np.float32)
    # the llama.cpp settings the runtime runs this file type with (f32: f32 KV cache, exact attention)
    settings = DECODER_QUANTS[quant].context_settings() if quant in DECODER_QUANTS else {}
    with Decoder(gguf_path, n_ctx=min(d.max_seq_len, 1 + cfg.n_inserted + n_text + 8), n_threads=n_threads,
                 **settings) as decoder:
        text = rng.integers(3, min(d.vocab_size, decoder.n_vocab), size=n_text).tolist()
        got = decoder.logits_for(block, text)
        bos = decoder.bos_id
    ref = reference_logits(model, cfg, bos, block, text, release_files)
    figures = compare_logits(ref, got)
    tol = dict(TOLERANCES[quant], **(tolerances or {}))
    figures["tolerance"] = tol
    bad = []
    if figures["rel"] > tol["rel"]:
        bad.append(f"max|diff|/std {figures['rel']:.4g} > {tol['rel']}")
    if figures["cos_min"] < tol["cos"]:
        bad.append(f"min cosine {figures['cos_min']:.6f} < {tol['cos']}")
    if figures["top1"] < tol["top1"]:
        bad.append(f"top-1 agreement {figures['top1']:.3f} < {tol['top1']}")
    if bad:
        raise ParityError(f"{gguf_path}: llama.cpp {quant} logits differ from the reference: {'; '.join(bad)}")
    log.info("GGUF %s parity: %s", quant, figures)
    return figures
