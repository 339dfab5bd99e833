"""OneLLM in plain PyTorch: the reference every exported artifact is checked against.

`OneLLM(cfg)` has exactly the parameters of the official checkpoint (spec section 6)
with the `llma.` prefix removed, so `load_state_dict(sd, strict=True, assign=True)`
takes the release as is. Only `cfg.modalities` get per-modality parameters. Nothing in
`__init__` computes on the weights, so `with torch.device("meta"): OneLLM(cfg)` builds
a shape-only model; the rotary tables are made lazily on the first decoder call.

Encoding one input, stage by stage (each method composes the stage functions of
`onellm.ref.stages`, which the exported graphs call too):

    patch_tokens(m, x)  [B, (T,) ...] -> [B*T, L, width]  tokenizer and pos-emb (row 0: pos[0])
    tokenize(m, x)      [B, (T,) ...] -> [B*T, L, width]  the above, then CLS and ln_pre
    clip_trunk(h)       [N, L, width] -> [N, L, width]    CLIP blocks, ln_post on all rows
    mean_frames(h, B)   [B*T, L, width] -> [B, L, width]  frame mean (video, rgbd, rgbn)
    upm(m, h)           [B, L, width] -> [B, 30, width]   clip_proj1, resample tokens, experts
    project(m, h)       [B, 30, width] -> [B, 32, dim]    clip_proj2, start/end tags
    encode(m, x)        all of the above

Decoding: `embed_tokens(ids)`, `build_sequence(ids, block)` ([BOS, block, ids[1:]]) and
`forward_decoder(h, start_pos, cache)` (RoPE at positions start_pos.., causal, optional
`KVCache`), returning fp32 logits.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from onellm.runtime.errors import ConfigError, InputError
from onellm.runtime.modalities import get_modality

from .clip import CLIP, LayerNorm
from .config import ModelConfig
from .decoder import KVCache, RMSNorm, TransformerBlock, rope_tables
from . import stages
from .point_utils import group_points
from .tokenizers import TOKENIZER_BUILDERS, expected_input_shape
from .upm import Mlp, build_expert, build_projection, routing_weights

log = logging.getLogger(__name__)

__all__ = ["KVCache", "OneLLM", "count_parameters", "init_random_weights"]


class OneLLM(nn.Module):
    """CLIP universal encoder + universal projection module + LLaMA decoder."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, c, u = cfg.decoder, cfg.clip, cfg.upm
        width = c.width

        # decoder
        self.tok_embeddings = nn.Embedding(d.vocab_size, d.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(d.dim, d.n_heads, d.ffn_hidden, d.norm_eps) for _ in range(d.n_layers)
        )
        self.norm = RMSNorm(d.dim, d.norm_eps)
        self.output = nn.Linear(d.dim, d.vocab_size, bias=False)

        # universal encoder
        self.clip = CLIP(c)

        # shared experts
        self.resample_layers = nn.ModuleDict(
            {str(e): build_expert(width, u.heads, cfg.upm_ffn_hidden, u.depth, u.norm_eps) for e in range(u.n_experts)}
        )

        # per modality
        self.conv1 = nn.ModuleDict()
        self.positional_embedding = nn.ParameterDict()
        self.routers = nn.ModuleDict()
        self.resample_tokens = nn.ParameterDict()
        self.clip_proj1 = nn.ModuleDict()
        self.clip_proj2 = nn.ModuleDict()
        self.start_tag = nn.ParameterDict()
        self.end_tag = nn.ParameterDict()
        self._kinds: dict[str, str] = {}
        self._frames: dict[str, int] = {}
        for m in cfg.modalities:
            spec = get_modality(m)
            self._kinds[m] = spec.tokenizer_kind
            self._frames[m] = spec.n_frames
            builder = TOKENIZER_BUILDERS[spec.tokenizer_kind]
            if builder is not None:
                self.conv1[m] = builder(cfg)
                n_tokens = cfg.tokenizers.n_patch_tokens(spec.tokenizer_kind, c) + 1
                self.positional_embedding[m] = nn.Parameter(torch.zeros(n_tokens, width))
            self.routers[m] = Mlp(width, cfg.router_hidden, u.n_experts)
            self.resample_tokens[m] = nn.Parameter(torch.zeros(1, u.n_resample_tokens, width))
            self.clip_proj1[m] = build_projection(width, width, u.proj_ln_eps)
            self.clip_proj2[m] = build_projection(width, d.dim, u.proj_ln_eps)
            self.start_tag[m] = nn.Parameter(torch.zeros(1, 1, d.dim))
            self.end_tag[m] = nn.Parameter(torch.zeros(1, 1, d.dim))

        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # lazily built, not a buffer

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def n_inserted(self) -> int:
        return self.cfg.n_inserted

    def _check_modality(self, modality: str) -> None:
        if modality not in self._kinds:
            get_modality(modality)  # an unregistered name lists the known ones
            raise ConfigError(
                f"model {self.cfg.name!r} has no parameters for modality {modality!r}; "
                f"it has: {', '.join(self.cfg.modalities)}"
            )

    def input_shape(self, modality: str) -> tuple[int, ...]:
        """Per-sample input shape (no batch dimension) that `encode(modality, x)` takes."""
        self._check_modality(modality)
        return expected_input_shape(self._kinds[modality], self._frames[modality], self.cfg)

    def init_random_(self, seed: int = 0, std: float = 0.02) -> OneLLM:
        init_random_weights(self, seed, std)
        return self

    # ------------------------------------------------------------------ encoder stages
    def patch_tokens(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """Modality input [B, *input_shape] -> [B*T, L, width]: the tokenizer with positions, no CLS yet."""
        self._check_modality(modality)
        kind = self._kinds[modality]
        expected = self.input_shape(modality)
        if x.ndim != len(expected) + 1 or tuple(x.shape[1:]) != expected:
            raise InputError(
                f"{modality} input", f"a tensor of shape [B, {', '.join(map(str, expected))}]", f"{list(x.shape)}"
            )
        visual = self.clip.visual
        if kind == "clip_patch":
            if len(expected) == 4:  # frames: [B, T, 3, H, W] -> [B*T, 3, H, W]
                x = x.reshape(-1, *x.shape[2:])
            module, pos = visual.conv1, visual.positional_embedding
            x = x.to(self.dtype)
        else:
            module, pos = self.conv1[modality], self.positional_embedding[modality]
            if kind == "point_patch":  # grouped in fp32 whatever the model dtype (spec section 4)
                x = group_points(x, module.n_groups, module.k, module.tie_break)
            else:
                x = x.to(self.dtype)
        return stages.embed_patches(kind, module, pos, x, self.cfg.clip.width, dtype=self.dtype)

    def tokenize(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """Modality input [B, *input_shape] -> [B*T, L, width] (CLS, pos-emb and ln_pre applied)."""
        visual = self.clip.visual
        return stages.begin_trunk(self.patch_tokens(modality, x), visual.class_embedding, visual.ln_pre)

    def clip_trunk(self, h: torch.Tensor) -> torch.Tensor:
        """CLIP's residual blocks, then ln_post on every token."""
        visual = self.clip.visual
        return stages.run_trunk(h, visual.transformer.resblocks, visual.ln_post)

    @staticmethod
    def mean_frames(h: torch.Tensor, batch_size: int) -> torch.Tensor:
        """[B*T, L, width] -> [B, L, width], averaging the T frames of each sample."""
        return stages.mean_frames(h, h.shape[0] // batch_size)

    def routing_weights(self, modality: str) -> torch.Tensor:
        """[n_resample, n_experts] expert weights of a modality (input-independent)."""
        self._check_modality(modality)
        return routing_weights(self.routers[modality], self.resample_tokens[modality][0])

    def upm(self, modality: str, h: torch.Tensor, full_last_block: bool = False) -> torch.Tensor:
        """CLIP features [B, L, width] -> [B, n_resample, width]: clip_proj1, resample tokens, experts."""
        self._check_modality(modality)
        x = stages.resample_input(h, self.clip_proj1[modality], self.resample_tokens[modality])
        return stages.mix_experts(self.resample_layers, x, self.routing_weights(modality),
                                  self.cfg.upm.n_resample_tokens, full_last_block)

    def project(self, modality: str, h: torch.Tensor) -> torch.Tensor:
        """[B, n_resample, width] -> the [B, n_inserted, dim] block: start_tag, clip_proj2(h), end_tag."""
        self._check_modality(modality)
        return stages.project(h, self.clip_proj2[modality], self.start_tag[modality], self.end_tag[modality])

    def encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """Modality input [B, *input_shape] -> the [B, n_inserted, dim] block put after BOS."""
        h = self.clip_trunk(self.tokenize(modality, x))
        h = self.mean_frames(h, x.shape[0])
        return self.project(modality, self.upm(modality, h))

    # ------------------------------------------------------------------ decoder
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, S] -> embeddings [B, S, dim]."""
        return self.tok_embeddings(ids)

    def build_sequence(self, ids: torch.Tensor, block: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder input [emb(ids[:, :1]), block, emb(ids[:, 1:])]; ids start with BOS."""
        h = self.embed_tokens(ids)
        if block is None:
            return h
        return torch.cat([h[:, :1], block.to(h.dtype), h[:, 1:]], dim=1)

    def new_cache(self, batch_size: int = 1, max_seq_len: int | None = None) -> KVCache:
        """An empty KV cache in the model's dtype and device (default: the full context)."""
        d = self.cfg.decoder
        n = d.max_seq_len if max_seq_len is None else min(max_seq_len, d.max_seq_len)
        return KVCache(d.n_layers, d.n_heads, d.head_dim, n, batch_size, self.dtype, self.device)

    def _rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].device != device:
            d = self.cfg.decoder
            self._rope = rope_tables(d.head_dim, d.max_seq_len, d.rope_theta, device=device)
        return self._rope

    def forward_decoder(
        self, h: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """Embeddings [B, S, dim] at positions start_pos.. -> fp32 logits [B, S (or 1), vocab].

        With a cache, keys/values are written at start_pos..start_pos+S-1 and the
        attention covers every cached position before them; without one, the S rows
        attend only to each other (causally). `last_only` returns the last row's logits.
        """
        bsz, seqlen, _ = h.shape
        end = start_pos + seqlen
        if end > self.cfg.decoder.max_seq_len:
            raise InputError(
                "decoder input", f"at most {self.cfg.decoder.max_seq_len} positions (the context)", f"{end}"
            )
        if cache is not None:
            cache.check(bsz, start_pos, seqlen)
        cos, sin = self._rope_tables(h.device)
        rope = (cos[start_pos:end], sin[start_pos:end])
        h = h.to(self.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope=rope, causal=True, cache=cache, layer=i, start_pos=start_pos)
        if cache is not None:
            cache.length = end
        h = self.norm(h[:, -1:] if last_only else h)
        return self.output(h).float()

    def forward(self, ids: torch.Tensor, block: torch.Tensor | None = None) -> torch.Tensor:
        """Uncached logits [B, S, vocab] of the whole sequence [BOS, block, ids[1:]]."""
        return self.forward_decoder(self.build_sequence(ids, block), 0)


STD_INIT = 0.02  # std of the seeded random weights (init_random_weights, testing.stream_random_checkpoint)


def is_norm_module(module: nn.Module) -> bool:
    """Whether random weights set this module's weight to 1 and bias to 0 instead of drawing them."""
    return isinstance(module, (RMSNorm, LayerNorm, nn.LayerNorm))


def init_random_weights(model: nn.Module, seed: int = 0, std: float = STD_INIT) -> None:
    """Small seeded random weights: normal(0, std) everywhere, norms weight 1 / bias 0.

    Deterministic for a given (config, seed), whatever the device or dtype.
    """
    gen = torch.Generator().manual_seed(seed)
    norm_params: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            if is_norm_module(module):
                module.weight.fill_(1.0)
                norm_params.add(id(module.weight))
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
                    norm_params.add(id(module.bias))
        for _, p in model.named_parameters():
            if id(p) in norm_params:
                continue
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std))


def _group_of(name: str) -> tuple[str, str | None]:
    """(group, modality) of a parameter name, for `count_parameters`."""
    head, _, rest = name.partition(".")
    if head in ("tok_embeddings", "layers", "norm", "output"):
        return "decoder", None
    if head == "clip":
        return ("clip_proj", None) if name == "clip.visual.proj" else ("clip", None)
    if head == "resample_layers":
        return "upm_experts", None
    modality = rest.partition(".")[0]
    if head in ("conv1", "positional_embedding"):
        return "tokenizer", modality
    return "upm_modality", modality  # routers, resample_tokens, clip_proj1/2, start/end tags


def count_parameters(cfg: ModelConfig) -> dict:
    """Parameter counts of `cfg`, built on the meta device (no memory used).

    Returns:
      decoder            LLaMA: tok_embeddings, layers, norm, output
      clip               CLIP visual tower as run (conv1, class/pos embedding, ln_pre,
                         blocks, ln_post); `clip_unused_proj` is its stored `proj`
      upm_experts        the shared expert blocks (resample_layers)
      upm_per_modality   {m: routers[m] + resample_tokens[m] + clip_proj1[m] +
                         clip_proj2[m] + start_tag[m] + end_tag[m]}
      upm                upm_experts + sum(upm_per_modality)
      tokenizers         {m: conv1[m] + positional_embedding[m]} (0 for CLIP-patch modalities,
                         which use CLIP's conv1 and positional embedding)
      total              everything in the state dict (clip_unused_proj included)
    """
    with torch.device("meta"):
        model = OneLLM(cfg)
    out: dict = {
        "decoder": 0,
        "clip": 0,
        "clip_unused_proj": 0,
        "upm_experts": 0,
        "upm_per_modality": {m: 0 for m in cfg.modalities},
        "tokenizers": {m: 0 for m in cfg.modalities},
    }
    total = 0
    for name, p in model.named_parameters():
        group, modality = _group_of(name)
        n = p.numel()
        total += n
        if group == "clip_proj":
            out["clip_unused_proj"] += n
        elif group == "tokenizer":
            out["tokenizers"][modality] += n
        elif group == "upm_modality":
            out["upm_per_modality"][modality] += n
        else:
            out[group] += n
    out["upm"] = out["upm_experts"] + sum(out["upm_per_modality"].values())
    out["total"] = total
    return out
