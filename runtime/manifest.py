"""The typed bundle manifest: the one contract between export and runtime.

Export builds a `Manifest` and writes `manifest.to_dict()` as `manifest.json`; the
runtime, the CLI, `onellm verify` and the bench read `Manifest.from_dict(json)` and
nothing else. Every class is a frozen dataclass with one comment per field.

`from_dict` is strict: an unknown or a missing key raises a `BundleError` naming the
key by its path (`decoder.quants.q8_0.file`), as does a value of the wrong type.
Optional fields are written as `null`, never left out. Mappings whose keys are
data (graph names, modalities, quantizations) are plain dicts; free-form figures
(parity, the model config, tool versions) are kept as JSON values.

Schema versions: 2 is written today. A version-1 dict (bundles exported before the
typed manifest) is migrated on read by `migrate_v1`; anything else is refused with a
request to re-export.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import BundleError
from .strict import Dim, Rules, Strict, load

SCHEMA = "onellm-bundle"
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"


class _Strict(Strict):
    """The manifest's classes: errors are BundleErrors that name the manifest key."""

    rules = Rules(BundleError, "manifest key",
                  " (a damaged manifest or another onellm version; re-export the bundle)")

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST, path: str = ""):
        return load(cls, data, where, path, cls.rules)


# ---------------------------------------------------------------------------- encoder


@dataclasses.dataclass(frozen=True)
class TensorSpec(_Strict):
    """One named input or output of a graph or a chain stage."""

    name: str  # the ONNX value name
    shape: tuple[Dim, ...]  # sizes; symbolic axes (graph signatures only) as strings
    dtype: str  # numpy dtype name: float32, float16, int64, int32


@dataclasses.dataclass(frozen=True)
class Graph(_Strict):
    """One `.onnx` file of an encoder variant."""

    file: str  # path relative to the bundle directory
    sha256: str  # hex digest of the file
    bytes: int  # file size
    inputs: tuple[TensorSpec, ...]  # graph inputs, symbolic axes kept
    outputs: tuple[TensorSpec, ...]  # graph outputs, symbolic axes kept
    used_by: tuple[str, ...]  # modalities whose chain runs this graph
    fused_ops: dict[str, int]  # onnxruntime transformer-optimizer fusion counts
    precision: str  # the precision the graph really has (the point tokenizer stays fp32)
    quantization: Any  # int8 graphs: how they were quantised (recipe, per-channel, calibration); else null
    parity: Any  # onnxruntime vs the torch export module: min_cosine, max_abs, per output
    export_seconds: float  # time to trace, fuse, convert and validate it


@dataclasses.dataclass(frozen=True)
class Stage(_Strict):
    """One step of a modality's chain with the concrete shapes of one sample (batch 1)."""

    graph: str  # graph name (a key of EncoderVariant.graphs)
    inputs: tuple[TensorSpec, ...]  # what it reads: the fed array, earlier outputs or constants
    outputs: tuple[TensorSpec, ...]  # what it writes; the runtime allocates these buffers


@dataclasses.dataclass(frozen=True)
class PointGrouping(_Strict):
    """Furthest-point sampling + kNN done in numpy before the point tokenizer graph."""

    groups: int  # number of sampled centres
    k: int  # neighbours per centre
    tie_break: str  # kNN tie order the reference used ("cuda" or "cpu")


@dataclasses.dataclass(frozen=True)
class Chain(_Strict):
    """A modality's encoder: graphs run in order, every buffer's shape recorded."""

    chain: tuple[str, ...]  # graph names in run order (tokenizer, trunk, pre, upm, post)
    stages: tuple[Stage, ...]  # the same graphs with their concrete input/output shapes
    input_shape: tuple[int, ...]  # the reader's array shape (what `Encoder.encode` takes)
    frames: int  # frames per sample (video: several; averaged in `pre`)
    tokens: int  # tokens per frame out of the tokenizer (incl. the CLS row)
    routing_weights: tuple[tuple[float, ...], ...]  # folded router output, UPM's constant `routing` input
    point_grouping: PointGrouping | None  # numpy grouping before the tokenizer (point clouds only)
    parity: Any  # the whole chain vs OneLLM.encode at export: cosine, max_abs


@dataclasses.dataclass(frozen=True)
class EncoderVariant(_Strict):
    """Every encoder graph at one precision, and every modality's chain over them."""

    precision: str  # a name in runtime.registry.ENCODER_PRECISIONS
    n_embd: int  # decoder width: the last stage writes [n_inserted, n_embd]
    n_inserted: int  # rows injected after BOS (30 resampled + start/end tags)
    width: int  # CLIP width between the tokenizer, trunk and UPM
    opset: int  # ONNX opset the graphs were exported with
    optimized: bool  # whether onnxruntime's transformer fusions ran
    batched_experts: bool  # UPM experts stacked into batched MatMuls
    graphs: dict[str, Graph]  # graph name -> file and signature
    modalities: dict[str, Chain]  # modality -> its chain


@dataclasses.dataclass(frozen=True)
class EncoderSection(_Strict):
    default: str  # precision used on CPU when none is asked for
    precisions: dict[str, EncoderVariant]  # precision -> variant


# ---------------------------------------------------------------------------- decoder, tokenizer, prompt


@dataclasses.dataclass(frozen=True)
class DecoderVariant(_Strict):
    """One GGUF file of the LLaMA decoder."""

    quant: str  # a name in runtime.registry.DECODER_QUANTS
    file: str  # path relative to the bundle directory
    sha256: str  # hex digest of the file
    bytes: int  # file size
    n_ctx: int  # the model's context length
    tolerance: dict[str, float]  # the tolerances it was validated against (rel, cos, top1)
    parity: Any  # llama.cpp vs the torch reference logits at export: rel, cos_min, top1, ...


@dataclasses.dataclass(frozen=True)
class DecoderSection(_Strict):
    default: str  # quantization used when none is asked for
    quants: dict[str, DecoderVariant]  # quantization -> GGUF


@dataclasses.dataclass(frozen=True)
class TokenizerSpec(_Strict):
    """The SentencePiece model and its special ids (read from the model at export)."""

    file: str  # path relative to the bundle directory
    bos_id: int  # begin-of-sequence id: the prompt starts with it
    eos_id: int  # end-of-sequence id: generation stops on it
    unk_id: int  # unknown-piece id
    vocab_size: int  # the decoder's vocabulary size


@dataclasses.dataclass(frozen=True)
class SamplingDefaults(_Strict):
    temperature: float  # softmax temperature of the release demo
    top_p: float  # nucleus mass
    max_new_tokens: int  # most new tokens per answer


@dataclasses.dataclass(frozen=True)
class PromptSpec(_Strict):
    """How a conversation becomes prompt text (rendered by runtime.prompt.Conversation)."""

    template: str  # the template's name ("v1", the one the checkpoint was tuned on)
    system: str  # the system sentence
    roles: tuple[str, ...]  # (user role, assistant role)
    sep: str  # the turn separator
    header: str  # text before the first turn; {system} and {sep} are filled in
    turn: str  # an answered turn; {role}, {message} and {sep} are filled in
    open_turn: str  # the turn the model completes; {role} and {sep} are filled in
    stop: tuple[str, ...]  # generation stops before any of these strings
    defaults: SamplingDefaults  # sampling when the caller gives none


# ---------------------------------------------------------------------------- the rest


@dataclasses.dataclass(frozen=True)
class Preprocessing(_Strict):
    """What a modality's reader produces, as exported (checked against this onellm's readers)."""

    cli_option: str  # the CLI flag that takes this modality's file
    file_types: tuple[str, ...]  # accepted file suffixes
    input_shape: tuple[int, ...]  # the array the reader returns
    input_dtype: str  # its dtype
    n_frames: int  # frames per sample
    n_tokens: int  # tokens per frame
    requires_image: bool  # needs an RGB photo as well (depth, normal maps)
    constants: Any  # the reader's numeric constants (normalisation, rates, sizes)


@dataclasses.dataclass(frozen=True)
class Source(_Strict):
    """What the bundle was exported from."""

    checkpoint: tuple[str, ...]  # checkpoint file names, in order
    sha256: str  # sha256 of the checkpoint (over per-file digests when sharded)
    clip_source: str | None  # where the CLIP weights came from
    tokenizer_sha256: str  # sha256 of tokenizer.model
    random_seed: int | None  # seed of a random-weight checkpoint (demo bundles: `verify` rebuilds it), else null


@dataclasses.dataclass(frozen=True)
class TensorRTEngines(_Strict):
    """TensorRT engines built at export, valid only on the machine fingerprint below."""

    dir: str  # the engine cache directory inside the bundle
    source_precision: str  # the encoder precision the engines were built from
    fingerprint: dict[str, str]  # GPU name, compute capability, TensorRT and onnxruntime versions
    files: tuple[str, ...]  # engine cache files, relative to the bundle


@dataclasses.dataclass(frozen=True)
class Manifest(_Strict):
    """`manifest.json`: everything the runtime knows about a bundle."""

    schema: str  # always SCHEMA
    schema_version: int  # SCHEMA_VERSION when written by this onellm
    created: str  # ISO time of the export (UTC)
    random_weights: bool  # the tiny demo model: answers are meaningless
    notice: str  # shown to users of a random-weight bundle ("" otherwise)
    preset: str  # model config preset name
    config: Any  # the full model config (onellm_ref ModelConfig.to_dict())
    source: Source  # checkpoint identity
    n_embd: int  # decoder width
    n_inserted: int  # encoder rows injected after BOS
    modalities: tuple[str, ...]  # exported modalities, in export order
    tokenizer: TokenizerSpec  # the SentencePiece model and special ids
    prompt: PromptSpec  # prompt template, stop strings, sampling defaults
    preprocessing: dict[str, Preprocessing]  # modality -> reader facts at export
    encoder: EncoderSection  # ONNX encoder variants
    decoder: DecoderSection  # GGUF decoder variants
    tensorrt: TensorRTEngines | None  # prebuilt TensorRT engines, if any
    tools: dict[str, str]  # package versions used by the export
    export_seconds: float | None  # wall time of the export
    files: dict[str, str]  # every file of the bundle (relative path) -> sha256

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST, path: str = "") -> Manifest:
        """Parse any supported schema version (version 1 is migrated first)."""
        if not isinstance(data, Mapping) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, Mapping) else type(data).__name__
            raise BundleError(f"{where}: expected schema {SCHEMA!r}, found {found!r}")
        version = data.get("schema_version")
        if version == 1:
            data = migrate_v1(data, where)
        elif version != SCHEMA_VERSION:
            raise BundleError(f"{where}: expected schema version 1 or {SCHEMA_VERSION}, found {version!r} "
                              f"(re-export the bundle with this onellm version)")
        return load(cls, data, where, path, cls.rules)


# ---------------------------------------------------------------------------- chains


def chain_stages(names: Sequence[str], graphs: Mapping[str, Graph], *, feed_shape: Sequence[int], frames: int,
                 tokens: int, width: int, n_inserted: int, n_embd: int, n_experts: int) -> tuple[Stage, ...]:
    """The stages of a tokenizer -> trunk -> pre -> upm -> post chain with one sample's shapes.

    Names of inputs and outputs come from the graph signatures; the sizes follow the
    model: the tokenizer and trunk keep [frames, tokens, width], `pre` averages the
    frames and prepends the n_inserted - 2 resample tokens, the UPM keeps those, and
    `post` writes [1, n_inserted, n_embd].
    """
    if len(names) != 5:
        raise BundleError(f"encoder chain {list(names)}: expected 5 graphs (tokenizer, trunk, pre, upm, post)")
    n_out = n_inserted - 2
    tok, trunk, pre, upm, post = (graphs[n] for n in names)
    per_frame = [frames, tokens, width]
    resampled = [1, n_out + tokens, width]
    upm_out = [1, n_out, width]

    def spec(sig: TensorSpec, shape: Sequence[int]) -> TensorSpec:
        return TensorSpec(sig.name, tuple(int(s) for s in shape), sig.dtype)

    def by_name(sig: TensorSpec) -> list[int]:  # the UPM's inputs: the tokens, and the routing constant
        return [n_out, n_experts] if sig.name == "routing" else resampled

    return (
        Stage(names[0], (spec(tok.inputs[0], feed_shape),), (spec(tok.outputs[0], per_frame),)),
        Stage(names[1], (spec(trunk.inputs[0], per_frame),), (spec(trunk.outputs[0], per_frame),)),
        Stage(names[2], (spec(pre.inputs[0], per_frame),), (spec(pre.outputs[0], resampled),)),
        Stage(names[3], tuple(spec(s, by_name(s)) for s in upm.inputs), (spec(upm.outputs[0], upm_out),)),
        Stage(names[4], (spec(post.inputs[0], upm_out),), (spec(post.outputs[0], [1, n_inserted, n_embd]),)),
    )


# ---------------------------------------------------------------------------- migration

def migrate_v1(data: Mapping[str, Any], where: str = MANIFEST) -> dict[str, Any]:
    """A version-1 manifest dict as version 2 (nothing is read from disk).

    Version 2 adds: the source's `random_seed` and each graph's `quantization` (null), per-chain `stages` with concrete shapes (version 1 left them to the
    runtime's list positions), the prompt's `header`/`turn`/`open_turn` formats, each
    GGUF's `sha256` (from the files table) and `tolerance` (out of its parity figures);
    it drops the encoder entries' inner `schema` and `tokenizer_input_shape` (now the
    first stage's input).
    """
    try:
        d = copy.deepcopy(dict(data))
        d["schema_version"] = SCHEMA_VERSION
        prompt = d["prompt"]
        if prompt.get("template") != "v1":
            raise BundleError(f"{where}: prompt template {prompt.get('template')!r} of a version-1 bundle is unknown")
        from .prompt import V1_PROMPT  # the formats version-1 runtimes rendered `v1` with

        prompt.update(header=V1_PROMPT.header, turn=V1_PROMPT.turn, open_turn=V1_PROMPT.open_turn)
        d["source"].setdefault("random_seed", None)
        for quant, dec in d["decoder"]["quants"].items():
            parity = dict(dec["parity"])
            dec["tolerance"] = parity.pop("tolerance")
            dec["parity"] = parity
            dec["sha256"] = d["files"][dec["file"]]
        for variant in d["encoder"]["precisions"].values():
            variant.pop("schema", None)
            for g in variant["graphs"].values():
                g.setdefault("quantization", None)
            graphs = {name: Graph.from_dict(g, where, f"encoder.graphs.{name}") for name, g in variant["graphs"].items()}
            for m, entry in variant["modalities"].items():
                feed = [int(entry.get("frames", 1)), *entry.pop("tokenizer_input_shape")]
                routing = entry["routing_weights"]
                stages = chain_stages(entry["chain"], graphs, feed_shape=feed, frames=int(entry.get("frames", 1)),
                                      tokens=int(entry["tokens"]), width=int(variant["width"]),
                                      n_inserted=int(variant["n_inserted"]), n_embd=int(variant["n_embd"]),
                                      n_experts=len(routing[0]))
                entry["stages"] = [s.to_dict() for s in stages]
                entry.setdefault("point_grouping", None)
        return d
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise BundleError(f"{where}: version-1 manifest could not be migrated (missing or malformed {exc})") from None
