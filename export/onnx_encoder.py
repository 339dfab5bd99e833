"""Export of OneLLM's encoder side to ONNX: tokenizers, CLIP trunk, UPM, projections.

In: a PyTorch reference `OneLLM` (onellm.ref), its `ModelConfig`, an output folder,
the modalities to export and a precision (fp32, fp16 for GPUs, int8 for CPUs).
Out: `.onnx` files and, per precision, the manifest's `EncoderVariant` (runtime/
manifest.py): graph entries (file, sha256, input/output names, shapes and dtypes,
parity figures) and one chain per modality naming its graphs with the concrete
input/output shapes of every stage. `export_encoders` returns them as plain dicts.

Stage split (no weight is stored twice; each graph holds the weights of one owner):

    tokenizer.clip_patch  CLIP conv1 + CLIP pos-emb; shared by image/video/rgbd/rgbn
    tokenizer.<m>         conv1[m] + positional_embedding[m] (audio, point, imu, fmri)
        [N, ...] -> [N, L, width]: row 0 = pos[0], rows 1.. = patches + pos[1:]
    trunk                 class_embedding (added to row 0), ln_pre, CLIP blocks, ln_post;
                          dynamic N and L, one graph for every modality
    pre.<m>               frame mean (T > 1), clip_proj1[m], resample_tokens[m] prepended
    upm                   the 3 experts (all blocks) mixed by a `routing` INPUT [30, 3]; only
                          the 30 read rows of each last block are computed
    post.<m>              clip_proj2[m], start_tag[m] and end_tag[m] -> [B, 32, n_embd]

CLS handling: the reference computes `cat(cls, patches) + pos`; here the tokenizer
graph emits pos[0] in row 0 and the trunk adds class_embedding to it. Float addition
commutes, so row 0 is bit-identical, and class_embedding and ln_pre (CLIP's, shared by
all modalities) live once, in the trunk. The routers are not exported at all: their
output depends only on the learned resample tokens (spec section 5), so each
modality's [30, n_experts] weights are computed here once and stored in its modality
entry (`routing_weights`); the runtime binds them as a constant input of the UPM graph.

The point tokenizer's furthest point sampling and kNN run in numpy in the runtime
(`onellm.runtime.point_grouping`, bit-exact with the reference); the graph takes the
grouped neighbourhoods [N, groups, k, C] and does the 1x1 conv and the max.

Validation right after writing each graph (like optimum's `validate_model_outputs`):
the torch module that was exported and onnxruntime run on the same inputs; then the
whole chain of every modality (run by `onellm.runtime.encoder.Encoder`) against the
reference's `OneLLM.encode`. Max-abs error and cosine similarity are recorded; a
cosine below the precision's threshold raises ParityError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from onellm.ref.config import ModelConfig
from onellm.ref import stages
from onellm.ref.model import OneLLM
from onellm.runtime.bundle import sha256_file
from onellm.runtime.encoder import session_kwargs
from onellm.runtime.errors import ConfigError, ParityError
from onellm.runtime.manifest import Chain, EncoderVariant, Graph, PointGrouping, TensorSpec, chain_stages
from onellm.runtime.modalities import get_modality
from onellm.runtime.point_grouping import group_points
from onellm.runtime.registry import ENCODER_PRECISIONS, OPENVINO_HINT

from .quantize import (
    DEFAULT_INT8_RECIPE,
    STATIC_OV_PRECISIONS,
    convert_fp16,
    optimize_graph,
    quantize_int8,
    quantize_static_qdq,
    unfuse_skip_layer_norm_file,
)

log = logging.getLogger(__name__)

# Cosine-similarity floors vs the torch fp32 reference (per graph and per chain), from the registry.
PARITY_MIN_COSINE = {p.name: p.min_cosine for p in ENCODER_PRECISIONS.values()}
OPSET = 18
DTYPE_NAMES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
}

Progress = Callable[[str, int, int], None]  # (what, done, total)


# ---------------------------------------------------------------------------- modules
# Each exported graph is one of these small modules. They hold references to the
# reference model's own submodules and parameters (no copies, and only those the graph
# reads) and call the reference's stage functions (`onellm.ref.stages`) on them, so the
# math exists once; parity checks prove the chain equals `OneLLM.encode`.


class FusableAttention(nn.Module):
    """CLIP's packed-in_proj attention in the pattern onnxruntime's CLIP attention fusion matches.

    q/k/v as three Linear layers on the same input (their weights are views of the
    packed in_proj, so nothing is copied and the packed tensor is not exported), the
    1/sqrt(d) scale applied to q@k^T. Equal to the reference's
    scaled_dot_product_attention up to rounding.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        width = attn.out_proj.in_features
        self.heads = attn.heads
        w, b = attn.in_proj_weight, attn.in_proj_bias
        self.q, self.k, self.v = (_linear_view(w[i * width : (i + 1) * width], b[i * width : (i + 1) * width])
                                  for i in range(3))
        self.out_proj = attn.out_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, width = x.shape
        hd = width // self.heads
        q = self.q(x).reshape(bsz, seqlen, self.heads, hd).transpose(1, 2)
        k = self.k(x).reshape(bsz, seqlen, self.heads, hd).transpose(1, 2)
        v = self.v(x).reshape(bsz, seqlen, self.heads, hd).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (hd**-0.5)
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.out_proj(out.transpose(1, 2).reshape(bsz, seqlen, width))


def _linear_view(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """An nn.Linear whose parameters are views of existing tensors (no copy)."""
    lin = nn.Linear(1, 1, device="meta")
    lin.in_features, lin.out_features = weight.shape[1], weight.shape[0]
    lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
    lin.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return lin


class FusableBlock(nn.Module):
    """A CLIP residual block with FusableAttention (same submodules otherwise)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.ln_1, self.ln_2, self.mlp = block.ln_1, block.ln_2, block.mlp
        self.attn = FusableAttention(block.attn)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.ln_1(h))
        return h + self.mlp(self.ln_2(h))


class ClipPatchTokenizer(nn.Module):
    """CLIP's conv1 + CLIP's positional embedding: frames [N, 3, H, W] -> [N, L, width]."""

    def __init__(self, model: OneLLM) -> None:
        super().__init__()
        self.conv1 = model.clip.visual.conv1
        self.pos = model.clip.visual.positional_embedding
        self.width = model.cfg.clip.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stages.embed_patches("clip_patch", self.conv1, self.pos, x, self.width)


class ModalityTokenizer(nn.Module):
    """A modality's own tokenizer module (conv1[m]) + its positional embedding."""

    def __init__(self, model: OneLLM, modality: str) -> None:
        super().__init__()
        self.kind = get_modality(modality).tokenizer_kind
        self.module = model.conv1[modality]
        self.pos = model.positional_embedding[modality]
        self.width = model.cfg.clip.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "point_patch":  # x: grouped neighbourhoods [N, groups, k, C]
            x = x.permute(0, 3, 1, 2)
        return stages.embed_patches(self.kind, self.module, self.pos, x, self.width)


class ClipTrunk(nn.Module):
    """class_embedding into row 0, ln_pre, CLIP's blocks, ln_post on every row."""

    def __init__(self, model: OneLLM, fusable_attention: bool = True) -> None:
        super().__init__()
        v = model.clip.visual
        self.class_embedding = v.class_embedding
        self.ln_pre, self.ln_post = v.ln_pre, v.ln_post
        blocks = v.transformer.resblocks
        self.blocks = nn.ModuleList(FusableBlock(b) for b in blocks) if fusable_attention else blocks

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return stages.run_trunk(stages.begin_trunk(tokens, self.class_embedding, self.ln_pre), self.blocks,
                                self.ln_post)


class PreUPM(nn.Module):
    """Frame mean (T > 1), clip_proj1[m], then resample_tokens[m] prepended."""

    def __init__(self, model: OneLLM, modality: str) -> None:
        super().__init__()
        self.frames = get_modality(modality).n_frames
        self.proj1 = model.clip_proj1[modality]
        self.tokens = model.resample_tokens[modality]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return stages.resample_input(stages.mean_frames(feats, self.frames), self.proj1, self.tokens)


class UPMExperts(nn.Module):
    """sum_e routing[:, e] * expert_e(x)[:, :30], the last block computing only those 30 rows."""

    def __init__(self, model: OneLLM) -> None:
        super().__init__()
        self.experts = model.resample_layers
        self.n_out = model.cfg.upm.n_resample_tokens

    def forward(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        return stages.mix_experts(self.experts, x, routing, self.n_out)


class UPMExpertsBatched(nn.Module):
    """The same computation with the experts stacked: one batched MatMul per weight kind.

    Weights are stacked [E, in, out] copies made at construction (each stored once in the
    graph, the per-expert tensors not at all).
    """

    def __init__(self, model: OneLLM) -> None:
        super().__init__()
        experts = [model.resample_layers[str(e)] for e in range(len(model.resample_layers))]
        self.n_out = model.cfg.upm.n_resample_tokens
        self.heads = model.cfg.upm.heads
        self.eps = model.cfg.upm.norm_eps
        self.depth = len(experts[0])
        for j in range(self.depth):
            blocks = [ex[j] for ex in experts]

            def stack(get, blocks=blocks):
                return torch.stack([get(b).detach().float() for b in blocks])

            self.register_buffer(f"attn_norm{j}", stack(lambda b: b.attention_norm.weight)[:, None, None, :])
            self.register_buffer(f"ffn_norm{j}", stack(lambda b: b.ffn_norm.weight)[:, None, None, :])
            for name in ("wq", "wk", "wv", "wo"):
                self.register_buffer(f"{name}{j}", stack(lambda b, n=name: getattr(b.attention, n).weight.t()))
            for name in ("w1", "w2", "w3"):
                self.register_buffer(f"{name}{j}", stack(lambda b, n=name: getattr(b.feed_forward, n).weight.t()))

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def _mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        e, b, s, d = x.shape  # [E, B, S, in] @ [E, in, out]
        return torch.matmul(x.reshape(e, b * s, d), w).reshape(e, b, s, w.shape[-1])

    def forward(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        n_exp = self.attn_norm0.shape[0]
        h = x.unsqueeze(0).expand(n_exp, -1, -1, -1)
        for j in range(self.depth):
            g = lambda name: getattr(self, f"{name}{j}")  # noqa: E731
            last = j == self.depth - 1
            n = self._norm(h, g("attn_norm"))
            nq = n[:, :, : self.n_out] if last else n
            res = h[:, :, : self.n_out] if last else h
            e, b, s, width = n.shape
            sq = nq.shape[2]
            hd = width // self.heads
            q = self._mm(nq, g("wq")).reshape(e * b, sq, self.heads, hd).transpose(1, 2)
            k = self._mm(n, g("wk")).reshape(e * b, s, self.heads, hd).transpose(1, 2)
            v = self._mm(n, g("wv")).reshape(e * b, s, self.heads, hd).transpose(1, 2)
            att = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * (hd**-0.5), dim=-1)
            o = torch.matmul(att, v).transpose(1, 2).reshape(e, b, sq, width)
            h = res + self._mm(o, g("wo"))
            m = self._norm(h, g("ffn_norm"))
            h = h + self._mm(F.silu(self._mm(m, g("w1"))) * self._mm(m, g("w3")), g("w2"))
        w = routing.t()[:, None, :, None]  # [E, 1, 30, 1]
        return (h * w).sum(dim=0)


class PostUPM(nn.Module):
    """clip_proj2[m], then start_tag[m] + 30 rows + end_tag[m]: [B, 30, width] -> [B, 32, n_embd]."""

    def __init__(self, model: OneLLM, modality: str) -> None:
        super().__init__()
        self.proj2 = model.clip_proj2[modality]
        self.start = model.start_tag[modality]
        self.end = model.end_tag[modality]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return stages.project(h, self.proj2, self.start, self.end)


# ---------------------------------------------------------------------------- plan


@dataclasses.dataclass
class GraphJob:
    """One graph to export: its module, example inputs, names and dynamic axes."""

    name: str
    module: nn.Module
    example: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic: tuple[dict[int, str], ...]  # per input: axis -> dimension name ("name" or "name>=min")
    used_by: tuple[str, ...]  # modalities whose chain runs it
    optimizer: str | None = None  # transformer-optimizer model_type, None = no fusion pass
    heads: int = 0
    width: int = 0
    keep_fp32: bool = False  # stays fp32 in fp16 exports (the point tokenizer, spec section 4)


def tokenizer_graph_name(modality: str) -> str:
    """Graph holding a modality's tokenizer weights (CLIP-patch modalities share CLIP's)."""
    kind = get_modality(modality).tokenizer_kind
    return "tokenizer.clip_patch" if kind == "clip_patch" else f"tokenizer.{modality}"


def tokenizer_input_shape(modality: str, cfg: ModelConfig) -> tuple[int, ...]:
    """Shape of one sample's tokenizer-graph input, without the leading N (frames x batch)."""
    spec = get_modality(modality)
    if spec.tokenizer_kind == "point_patch":
        t = cfg.tokenizers
        return (t.point_groups, t.point_k, t.point_channels)
    shape = tuple(spec.input_shape)
    return shape[1:] if spec.n_frames > 1 else shape


def plan_graphs(model: OneLLM, cfg: ModelConfig, modalities: Sequence[str], batched_experts: bool = False) -> list[GraphJob]:
    """The graphs the given modalities need, each once, in chain order."""
    width, n_out = cfg.clip.width, cfg.upm.n_resample_tokens
    jobs: dict[str, GraphJob] = {}

    def add(job: GraphJob, modality: str) -> None:
        if job.name in jobs:
            jobs[job.name].used_by += (modality,)
        else:
            job.used_by = (modality,)
            jobs[job.name] = job

    gen = torch.Generator().manual_seed(0)
    for m in modalities:
        spec = get_modality(m)
        n_tok = spec.n_tokens
        t = spec.n_frames
        tok_name = tokenizer_graph_name(m)
        x_tok = torch.randn((2, *tokenizer_input_shape(m, cfg)), generator=gen)
        module = ClipPatchTokenizer(model) if tok_name == "tokenizer.clip_patch" else ModalityTokenizer(model, m)
        add(GraphJob(tok_name, module, (x_tok,), ("x",), ("tokens",), ({0: "n"},), (),
                     keep_fp32=spec.tokenizer_kind == "point_patch"), m)
        add(GraphJob("trunk", ClipTrunk(model), (torch.randn(2, n_tok, width, generator=gen),), ("tokens",),
                     ("features",), ({0: "n", 1: "tokens"},), (), optimizer="clip",
                     heads=cfg.clip.heads, width=width), m)
        add(GraphJob(f"pre.{m}", PreUPM(model, m), (torch.randn(2 * t, n_tok, width, generator=gen),),
                     ("features",), ("upm_input",), ({0: "n"},), ()), m)
        upm = UPMExpertsBatched(model) if batched_experts else UPMExperts(model)
        add(GraphJob("upm", upm, (torch.randn(2, n_out + n_tok, width, generator=gen),
                                  model.routing_weights(m).detach().float()),
                     ("upm_input", "routing"), ("resampled",), ({0: "batch", 1: f"rows>={n_out + 1}"}, {}), (),
                     optimizer="bert", heads=cfg.upm.heads, width=width), m)
        add(GraphJob(f"post.{m}", PostUPM(model, m), (torch.randn(2, n_out, width, generator=gen),),
                     ("resampled",), ("embeddings",), ({0: "batch"},), ()), m)
    return list(jobs.values())


# ---------------------------------------------------------------------------- export


def export_encoder(
    model: OneLLM,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    modalities: Sequence[str] | None = None,
    precision: str = "fp32",
    progress: Progress | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Write the encoder graphs of `modalities` at one `precision` into out_dir; return their entries.

    Returns the dict form of `runtime.manifest.EncoderVariant`: {"precision", "n_embd",
    "n_inserted", "width", "opset", "optimized", "batched_experts", "graphs": {name: entry},
    "modalities": {name: chain}}: a graph entry has file (relative to `relative_to`,
    default out_dir), sha256, bytes, inputs/outputs ([{name, shape, dtype}], symbolic axes
    as strings), used_by, fused ops and parity; a chain has its graph names, its stages
    with concrete shapes, input shape, frames, the point-grouping parameters, the folded
    routing weights and the chain's parity vs `OneLLM.encode`.
    Raises ParityError when a graph or chain falls below PARITY_MIN_COSINE[precision].
    Options: see `export_encoders`.
    """
    return export_encoders(model, cfg, out_dir, modalities, (precision,), progress, **options)[precision]


def export_encoders(
    model: OneLLM,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    modalities: Sequence[str] | None = None,
    precisions: Sequence[str] = ("fp32",),
    progress: Progress | None = None,
    *,
    optimize: bool = True,
    batched_experts: bool = False,
    relative_to: str | os.PathLike | None = None,
    seed: int = 0,
    int8_recipe: str = DEFAULT_INT8_RECIPE,
    calibration: Mapping[str, Sequence[np.ndarray]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Like `export_encoder` for several precisions at once: {precision: entries} (dicts).

    `export_encoder_variants` takes the same arguments and returns the typed variants.
    """
    variants = export_encoder_variants(model, cfg, out_dir, modalities, precisions, progress, optimize=optimize,
                                       batched_experts=batched_experts, relative_to=relative_to, seed=seed,
                                       int8_recipe=int8_recipe, calibration=calibration)
    return {p: v.to_dict() for p, v in variants.items()}


def export_encoder_variants(
    model: OneLLM,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    modalities: Sequence[str] | None = None,
    precisions: Sequence[str] = ("fp32",),
    progress: Progress | None = None,
    *,
    optimize: bool = True,
    batched_experts: bool = False,
    relative_to: str | os.PathLike | None = None,
    seed: int = 0,
    int8_recipe: str = DEFAULT_INT8_RECIPE,
    calibration: Mapping[str, Sequence[np.ndarray]] | None = None,
) -> dict[str, EncoderVariant]:
    """The graphs of `modalities` at each precision, validated: {precision: EncoderVariant}.

    Each graph is traced from torch once; the precisions are derived from that fp32
    graph (files `<graph>.<precision>.onnx`). `optimize` runs onnxruntime's transformer
    fusions on the trunk and the UPM; `batched_experts` exports the UPM with the three
    experts stacked into batched MatMuls instead of three chains. `int8_recipe` picks how
    the int8 graphs are quantised (`export.quantize.INT8_RECIPES`; calibration-free ones only).
    ov-int8 quantises the plain trunk and UPM statically (`quantize_static_qdq`), calibrated
    on `CALIBRATION_PER_MODALITY` seeded inputs of every exported modality, its example from
    examples/ (source checkouts) and its arrays in `calibration` (preprocessed, each of the
    modality's input shape: real recordings make better scales than random ones); its other
    graphs stay fp32.
    """
    for p in precisions:
        if p not in ENCODER_PRECISIONS:
            raise ConfigError(f"unknown encoder precision {p!r}; known: {', '.join(ENCODER_PRECISIONS)}")
    if any(p in STATIC_OV_PRECISIONS for p in precisions):
        import importlib.util

        missing = [n for n in ("nncf", "openvino") if importlib.util.find_spec(n) is None]
        if missing:
            raise ConfigError(f"encoder precision ov-int8 needs {' and '.join(missing)} at export (NNCF quantises, "
                              f"OpenVINO validates the chains): {OPENVINO_HINT}")
    modalities = list(cfg.modalities if modalities is None else modalities)
    for m in modalities:
        if m not in cfg.modalities:
            raise ConfigError(f"modality {m!r} is not in config {cfg.name!r} (it has {', '.join(cfg.modalities)})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(relative_to) if relative_to is not None else out_dir
    ref = fp32_reference(model)
    jobs = plan_graphs(ref, cfg, modalities, batched_experts=batched_experts)
    total = len(jobs) + len(modalities) * len(precisions)
    graphs: dict[str, dict[str, Graph]] = {p: {} for p in precisions}
    started = time.perf_counter()
    feeds = held_out = None
    if any(p in STATIC_OV_PRECISIONS for p in precisions):
        feeds = calibration_feeds(ref, cfg, jobs, modalities, seed, calibration or {})
        held_out = calibration_feeds(ref, cfg, jobs, modalities, seed, {}, holdout=True)
    with tempfile.TemporaryDirectory(prefix="onellm-onnx-") as tmp:
        for i, job in enumerate(jobs):
            if progress:
                progress(f"graph {job.name}", i, total)
            for p, entry in _export_one(job, out_dir, Path(tmp), precisions, optimize, root, seed,
                                        int8_recipe, feeds, held_out).items():
                graphs[p][job.name] = entry
    results = {}
    references: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # modality -> (input, torch output)
    done = len(jobs)
    for p in precisions:
        result = EncoderVariant(
            precision=p,
            n_embd=cfg.decoder.dim,
            n_inserted=cfg.n_inserted,
            width=cfg.clip.width,
            opset=OPSET,
            optimized=bool(optimize),
            batched_experts=bool(batched_experts),
            graphs=graphs[p],
            modalities={m: _modality_entry(ref, cfg, m, graphs[p]) for m in modalities},
        )
        results[p] = _validate_chains(ref, result, root, p, modalities, progress, done, total, seed, references)
        done += len(modalities)
    if progress:
        progress("done", total, total)
    log.info("encoder %s: %d graphs, %d modalities in %.1fs", "/".join(precisions), len(jobs), len(modalities),
             time.perf_counter() - started)
    return results


def fp32_reference(model: OneLLM) -> OneLLM:
    """The model itself when its encoder weights are fp32 on CPU, else an encoder-only fp32 copy.

    The copy has the same config with a 0-layer, 1-token decoder stand-in, so a 7B model
    loaded in fp16 costs only the encoder's ~0.7B parameters in fp32 here.
    """
    enc = [(n, p) for n, p in model.named_parameters() if not _is_decoder_key(n)]
    if all(p.dtype == torch.float32 and p.device.type == "cpu" for _, p in enc):
        return model.eval()
    cfg = model.cfg
    slim_cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, n_layers=0, vocab_size=1))
    with torch.device("meta"):
        slim = OneLLM(slim_cfg)
    state = {n: p.detach().to("cpu", torch.float32) for n, p in enc}
    for n in ("tok_embeddings.weight", "output.weight"):
        state[n] = torch.zeros(1, cfg.decoder.dim)
    state["norm.weight"] = torch.ones(cfg.decoder.dim)
    slim.load_state_dict(state, strict=True, assign=True)
    return slim.eval()


def _is_decoder_key(name: str) -> bool:
    return name.split(".", 1)[0] in ("tok_embeddings", "layers", "norm", "output")


CALIBRATION_PER_MODALITY = 4  # seeded random inputs per modality that calibrate the static int8 graphs


def calibration_feeds(ref: OneLLM, cfg: ModelConfig, jobs: Sequence[GraphJob], modalities: Sequence[str], seed: int,
                      extra: Mapping[str, Sequence[np.ndarray]],
                      holdout: bool = False) -> dict[str, list[dict[str, np.ndarray]]]:
    """The trunk's and the UPM's feeds on the calibration inputs of every modality: {graph: [feeds]}.

    Each input goes through the exported modules themselves (tokenizer, trunk, pre-UPM), so the
    feeds are exactly what those graphs receive in the chain. `holdout`: instead, one seeded
    input per modality that does not calibrate (what a static graph is validated on: random
    tokens, the other precisions' check, lie outside any calibrated range).
    """
    for m in extra:
        if m not in modalities:
            raise ConfigError(f"calibration inputs for {m!r}, which is not exported "
                              f"(exporting {', '.join(modalities)})")
    by_name = {j.name: j for j in jobs}
    if "trunk" not in by_name or "upm" not in by_name:
        return {}
    out: dict[str, list[dict[str, np.ndarray]]] = {"trunk": [], "upm": []}
    trunk, upm_inputs = by_name["trunk"].module, by_name["upm"].input_names
    with torch.no_grad():
        for i, m in enumerate(modalities):
            spec = get_modality(m)
            tok, pre = by_name[tokenizer_graph_name(m)].module, by_name[f"pre.{m}"].module
            routing = ref.routing_weights(m).detach().float().numpy()
            if holdout:
                xs = [chain_input(m, [seed, 2000 + i])]
            else:
                xs = [chain_input(m, [seed, 1000 + i, k]) for k in range(CALIBRATION_PER_MODALITY)]
                xs += _example_arrays(m)
            for k, x in enumerate(() if holdout else extra.get(m, ())):
                x = np.asarray(x, np.float32)
                if x.shape != tuple(spec.input_shape):
                    raise ConfigError(f"calibration input {k} of {m!r}: expected shape {list(spec.input_shape)}, "
                                      f"found {list(x.shape)}")
                xs.append(x)
            for x in xs:
                if spec.tokenizer_kind == "point_patch":
                    t = cfg.tokenizers
                    x = group_points(x, t.point_groups, t.point_k, getattr(ref.conv1[m], "tie_break", "cuda"))[None]
                tokens = tok(torch.from_numpy(np.ascontiguousarray(x)).reshape(-1, *tokenizer_input_shape(m, cfg)))
                u = pre(trunk(tokens))
                out["trunk"].append({by_name["trunk"].input_names[0]: tokens.numpy()})
                out["upm"].append(dict(zip(upm_inputs, (u.numpy(), routing))))
    return out


def _example_arrays(modality: str) -> list[np.ndarray]:
    """The modality's example from examples/ (a source checkout), read as `ask` reads it; [] elsewhere."""
    from onellm.runtime.modalities import example_inputs
    from onellm.runtime.pipeline import read_input

    found = example_inputs(modality)
    name = get_modality(modality).input_name
    if not found or name not in found:
        return []
    logging.disable(logging.WARNING)  # the reader's notes on the example (e.g. the IMU window) are not news here
    try:
        return [np.asarray(read_input(modality, found[name], image=found.get("image")).array, np.float32)]
    finally:
        logging.disable(logging.NOTSET)


def _export_one(job: GraphJob, out_dir: Path, tmp: Path, precisions: Sequence[str], optimize: bool, root: Path,
                seed: int, int8_recipe: str = DEFAULT_INT8_RECIPE,
                calibration: Mapping[str, list[dict[str, np.ndarray]]] | None = None,
                held_out: Mapping[str, list[dict[str, np.ndarray]]] | None = None) -> dict[str, Graph]:
    """Trace one graph, fuse it, derive each precision, validate each right after writing it."""
    started = time.perf_counter()
    raw = tmp / f"{job.name}.raw.onnx"
    _torch_export(job, raw)
    fused: dict[str, int] = {}
    src = raw
    if optimize and job.optimizer:
        src = tmp / f"{job.name}.opt.onnx"
        with _quiet_loggers():
            fused = optimize_graph(raw, src, job.optimizer, job.heads, job.width)
    base_seconds = time.perf_counter() - started
    entries = {}
    for precision in precisions:
        t0 = time.perf_counter()
        dst = out_dir / f"{job.name}.{precision}.onnx"
        effective = "fp32" if (precision == "fp16" and job.keep_fp32) else precision
        static = precision in STATIC_OV_PRECISIONS
        if static and job.name not in (calibration or {}):
            effective = "fp32"  # the small graphs of an OpenVINO chain: plain fp32
        with _quiet_loggers():
            if static and effective == "fp32":
                shutil.copyfile(raw, dst)  # OpenVINO reads plain ONNX ops, not onnxruntime's fused ones
            elif static:
                quantization = quantize_static_qdq(raw, dst, calibration[job.name])
            elif effective == "fp32":
                shutil.copyfile(src, dst)
            elif effective == "fp16":
                convert_fp16(src, dst)
            else:
                quantization = quantize_int8(src, dst, recipe=int8_recipe)
        # int8 runs on CPUs only, where onnxruntime's fused SkipLayerNormalization kernel is slow
        split = effective == "int8" and fused.get("SkipLayerNormalization")  # no reload of graphs without any
        graph_fused = {} if static else unfuse_skip_layer_norm_file(dst, fused) if split else fused
        if static and effective != "fp32":
            parity = _validate_static_graph(job, dst, effective, held_out[job.name])
        else:
            parity = _validate_graph(job, dst, effective, seed)
        entry = graph_entry(dst, root,
                            used_by=tuple(job.used_by),
                            fused_ops=graph_fused,
                            precision=effective,
                            quantization=quantization if effective in ("int8", *STATIC_OV_PRECISIONS) else None,
                            parity=parity,
                            export_seconds=round(base_seconds + time.perf_counter() - t0, 2))
        log.info("%s: %.1f MB, cos %.7f, max-abs %.3g", dst.name, entry.bytes / 1e6, parity["min_cosine"],
                 parity["max_abs"])
        entries[precision] = entry
    return entries


def _torch_export(job: GraphJob, path: Path) -> None:
    dims: dict[str, Any] = {}
    dynamic = []
    for axes in job.dynamic:
        spec = {}
        for axis, text in axes.items():
            name, _, low = text.partition(">=")
            if name not in dims:
                dims[name] = torch.export.Dim(name, min=int(low or 1), max=1 << 16)
            spec[axis] = dims[name]
        dynamic.append(spec)
    with _quiet_loggers(), torch.no_grad(), warnings.catch_warnings(), _silenced_stdout():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            job.module.eval(), job.example, str(path), dynamo=True, opset_version=OPSET,
            input_names=list(job.input_names), output_names=list(job.output_names),
            dynamic_shapes=tuple(dynamic), external_data=False, optimize=True, verbose=False,
        )


# Loggers of torch.onnx, onnxscript/onnx_ir and onnxruntime's transformer optimizer (whose
# modules log under their bare file names) that report every pass at INFO level.
_NOISY_LOGGERS = (
    "torch.onnx", "torch.export", "torch._export", "torch._dynamo", "onnxscript", "onnx_ir", "onnxruntime",
    "fusion_base", "fusion_utils", "onnx_model", "onnx_model_bert", "onnx_model_clip", "optimizer",
    "float16", "quantize",
)


class _quiet_loggers:
    def __enter__(self):
        self._levels = [(lg, lg.level) for lg in map(logging.getLogger, _NOISY_LOGGERS)]
        for lg, _ in self._levels:
            lg.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        for lg, level in self._levels:
            lg.setLevel(level)
        return False


class _silenced_stdout:
    """torch.onnx prints its progress lines; keep them out of our output (fd-level)."""

    def __enter__(self):
        import sys

        sys.stdout.flush()
        self._saved = os.dup(1)
        self._null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(self._null, 1)
        return self

    def __exit__(self, *exc):
        import sys

        sys.stdout.flush()
        os.dup2(self._saved, 1)
        os.close(self._saved)
        os.close(self._null)
        return False


def graph_entry(path: Path, root: Path, **facts: Any) -> Graph:
    """The manifest entry of one .onnx file: file, sha256, bytes, typed signature, plus `facts`
    (used_by, fused_ops, precision, parity, export_seconds)."""
    model = onnx.load(str(path), load_external_data=False)

    def sig(values) -> tuple[TensorSpec, ...]:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim)
            out.append(TensorSpec(v.name, shape, DTYPE_NAMES.get(t.elem_type, str(t.elem_type))))
        return tuple(out)

    return Graph(
        file=os.path.relpath(path, root),
        sha256=sha256_file(path),
        bytes=path.stat().st_size,
        inputs=sig(model.graph.input),
        outputs=sig(model.graph.output),
        **facts,
    )


# ---------------------------------------------------------------------------- parity


def compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Max-abs error and cosine similarity of two arrays (flattened, in fp64)."""
    a = np.asarray(ref, dtype=np.float64).ravel()
    b = np.asarray(got, dtype=np.float64).ravel()
    if a.shape != b.shape:
        return {"max_abs": float("inf"), "cosine": -1.0}
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    cos = float(a @ b / denom) if denom > 0 else (1.0 if not a.any() and not b.any() else 0.0)
    return {"max_abs": float(np.abs(a - b).max()) if a.size else 0.0, "cosine": cos}


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # don't starve torch
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], **session_kwargs("cpu"))


def _validate_graph(job: GraphJob, path: Path, precision: str, seed: int) -> dict[str, Any]:
    """torch module vs onnxruntime on a fresh input with the example's shapes (batch 1 where dynamic)."""
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = []
    for x, axes in zip(job.example, job.dynamic):
        shape = list(x.shape)
        if 0 in axes and job.name.startswith("pre."):
            shape[0] = x.shape[0] // 2  # one sample's frames
        elif 0 in axes:
            shape[0] = 1
        inputs.append(torch.randn(shape, generator=gen) if axes else x)
    with torch.no_grad():
        expected = job.module(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    sess = _session(path)
    got = sess.run(list(job.output_names), {n: t.numpy() for n, t in zip(job.input_names, inputs)})
    per_output = {n: compare(e.numpy(), g) for n, e, g in zip(job.output_names, expected, got)}
    min_cos = min(v["cosine"] for v in per_output.values())
    max_abs = max(v["max_abs"] for v in per_output.values())
    floor = PARITY_MIN_COSINE["fp32" if job.keep_fp32 else precision]
    if not min_cos >= floor:
        raise ParityError(
            f"{path.name}: onnxruntime vs torch cosine {min_cos:.7f} is below the {precision} floor {floor} "
            f"(max-abs error {max_abs:.3g})"
        )
    return {"against": "torch export module", "min_cosine": min_cos, "max_abs": max_abs, "outputs": per_output}


def _validate_static_graph(job: GraphJob, path: Path, precision: str,
                           feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, Any]:
    """A static int8 graph, run by OpenVINO as the runtime runs it, vs the torch module on
    held-out feeds (one input per modality, none of them calibrated on); the worst one counts."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU")
    worst: dict[str, dict[str, float]] = {}
    for feed in feeds:
        with torch.no_grad():
            expected = job.module(*[torch.from_numpy(feed[n]) for n in job.input_names])
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = {port.get_any_name(): value for port, value in compiled.create_infer_request().infer(feed).items()}
        for n, e in zip(job.output_names, expected):
            fig = compare(e.numpy(), np.asarray(got[n]))
            if n not in worst or fig["cosine"] < worst[n]["cosine"]:
                worst[n] = fig
    min_cos = min(v["cosine"] for v in worst.values())
    max_abs = max(v["max_abs"] for v in worst.values())
    floor = PARITY_MIN_COSINE[precision]
    if not min_cos >= floor:
        raise ParityError(f"{path.name}: OpenVINO vs torch cosine {min_cos:.7f} on held-out inputs is below the "
                          f"{precision} floor {floor} (max-abs error {max_abs:.3g})")
    return {"against": "torch export module", "inputs": f"{len(feeds)} held-out (one per modality), OpenVINO",
            "min_cosine": min_cos, "max_abs": max_abs, "outputs": worst}


def _modality_entry(ref: OneLLM, cfg: ModelConfig, m: str, graphs: dict[str, Graph]) -> Chain:
    """A modality's chain (parity still empty: `_validate_chains` measures it)."""
    spec = get_modality(m)
    names = (tokenizer_graph_name(m), "trunk", f"pre.{m}", "upm", f"post.{m}")
    routing = ref.routing_weights(m).detach().float()
    grouping = None
    if spec.tokenizer_kind == "point_patch":
        t = cfg.tokenizers
        grouping = PointGrouping(t.point_groups, t.point_k, getattr(ref.conv1[m], "tie_break", "cuda"))
    stages = chain_stages(names, graphs, feed_shape=(spec.n_frames, *tokenizer_input_shape(m, cfg)),
                          frames=spec.n_frames, tokens=spec.n_tokens, width=cfg.clip.width,
                          n_inserted=cfg.n_inserted, n_embd=cfg.decoder.dim, n_experts=int(routing.shape[-1]))
    return Chain(chain=names, stages=stages, input_shape=tuple(spec.input_shape), frames=spec.n_frames,
                 tokens=spec.n_tokens, routing_weights=tuple(tuple(row) for row in routing.tolist()),
                 point_grouping=grouping, parity={})


def _validate_chains(ref: OneLLM, result: EncoderVariant, root: Path, precision: str, modalities: Sequence[str],
                     progress: Progress | None, done: int, total: int, seed: int,
                     references: dict[str, tuple[np.ndarray, np.ndarray]]) -> EncoderVariant:
    """Every modality's whole chain, run by the runtime's Encoder, vs `OneLLM.encode`; returns
    the variant with each chain's parity filled in.

    `references` caches (input, torch output) per modality across precisions.
    """
    from onellm.runtime.encoder import Encoder

    chains = dict(result.modalities)
    with Encoder(result, root, device="cpu", verify=False) as enc:
        for i, m in enumerate(modalities):
            if progress:
                progress(f"chain {m}", done + i, total)
            if m not in references:
                x = chain_input(m, [seed, i])
                references[m] = (x, reference_block(ref, m, x))
            x, expected = references[m]
            fig, ok = check_chain(enc, m, x, expected, precision)
            chains[m] = dataclasses.replace(chains[m], parity=fig)
            if not ok:
                raise ParityError(
                    f"encoder chain of {m!r} ({precision}): cosine {fig['cosine']:.7f} vs the torch reference "
                    f"is below {PARITY_MIN_COSINE[precision]} (max-abs error {fig['max_abs']:.3g})"
                )
            log.info("chain %s (%s): cos %.7f max-abs %.3g", m, precision, fig["cosine"], fig["max_abs"])
    return dataclasses.replace(result, modalities=chains)


def chain_input(modality: str, seed) -> np.ndarray:
    """The seeded random input a chain check runs on (the modality's own `dummy_input`)."""
    return get_modality(modality).dummy_input(np.random.default_rng(seed)).astype(np.float32)


def reference_block(ref: OneLLM, modality: str, x: np.ndarray) -> np.ndarray:
    """`OneLLM.encode` of one input as a float32 [n_inserted, n_embd] array."""
    with torch.no_grad():
        return ref.encode(modality, torch.from_numpy(x)[None]).float().numpy()[0]


def check_chain(enc, modality: str, x: np.ndarray, expected: np.ndarray, precision: str) -> tuple[dict[str, Any], bool]:
    """One chain check, the same at export and in `onellm verify`: the runtime's encoder on `x`
    against the reference block; (figures, whether the cosine meets the precision's floor)."""
    fig = compare(expected, enc.encode(modality, x))
    fig["against"] = "OneLLM.encode (torch fp32)"
    return fig, bool(fig["cosine"] >= PARITY_MIN_COSINE[precision])


def count_initializer_bytes(paths: Sequence[Path]) -> dict[str, Any]:
    """Bytes of all initializers per file, and where each distinct tensor (64+ elements, not
    all-equal like a fresh norm's ones) is stored, keyed by the sha256 of its bytes.

    For checking that no weight is stored twice across a set of graphs.
    """
    from onnx import numpy_helper

    per_file: dict[str, int] = {}
    digests: dict[str, list[str]] = {}
    for p in paths:
        model = onnx.load(str(p))
        n = 0
        for init in model.graph.initializer:
            arr = numpy_helper.to_array(init)
            n += arr.nbytes
            if arr.size >= 64 and arr.min() != arr.max():
                digests.setdefault(hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest(), []).append(
                    f"{p.name}:{init.name}"
                )
        per_file[p.name] = n
    return {"per_file": per_file, "digests": digests}

