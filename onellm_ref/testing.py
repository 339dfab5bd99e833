"""Seeded random OneLLM checkpoints and a tiny SentencePiece tokenizer.

For tests and `onellm export --demo`: everything the pipeline needs, without the
15 GB release. In: a `ModelConfig` (usually the `tiny` preset) and a seed. Out:
- `save_random_checkpoint`: a random model written in the release's own key format
  (`llma.` prefix; optionally the ten-shard layout, CLIP text-tower leftovers, or the
  CLIP visual tower split out into an OpenAI- or open_clip-style file);
- `stream_random_checkpoint`: the same single-file checkpoint written one tensor at a
  time (peak memory: one tensor, not the model), for release-size configs such as `7b`;
- `train_tiny_tokenizer`: a LLaMA-like SentencePiece BPE model (byte fallback, unk 0,
  bos 1, eos 2, no pad) trained on a small English corpus kept in this module.
The weights are random: answers generated with them are meaningless text.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import pickle
import sys
import warnings
from pathlib import Path

import torch

from onellm.runtime.errors import CheckpointError

from .checkpoint import CLIP_VISUAL, PREFIX, parse_dtype
from .config import ModelConfig

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.model"
CLIP_STYLES = ("openai", "open_clip", "torchscript")


def random_state_dict(cfg: ModelConfig, seed: int, dtype: str | torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A seeded random reference model's state dict (keys without the `llma.` prefix)."""
    from .model import OneLLM

    try:
        from .model import init_random_weights
    except ImportError:  # the model may offer it as a method instead
        init_random_weights = None
    model = OneLLM(cfg)
    if init_random_weights is not None:
        init_random_weights(model, seed)
    else:
        model.init_random_(seed)
    target = parse_dtype(dtype)
    return {
        k: (v.detach().to(target) if v.is_floating_point() else v.detach()).clone().contiguous()
        for k, v in model.state_dict().items()
    }


def clip_text_tower(cfg: ModelConfig, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Small stand-ins for the CLIP text-tower keys the release may carry (never used)."""
    g = torch.Generator().manual_seed(seed + 7919)
    w = max(8, cfg.clip.output_dim // 4)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * 0.02).to(dtype)

    return {
        "clip.token_embedding.weight": rnd(16, w),
        "clip.positional_embedding": rnd(8, w),
        "clip.transformer.resblocks.0.attn.in_proj_weight": rnd(3 * w, w),
        "clip.transformer.resblocks.0.attn.in_proj_bias": rnd(3 * w),
        "clip.transformer.resblocks.0.ln_1.weight": rnd(w),
        "clip.ln_final.weight": rnd(w),
        "clip.ln_final.bias": rnd(w),
        "clip.text_projection": rnd(w, cfg.clip.output_dim),
        "clip.logit_scale": torch.tensor(4.6052, dtype=dtype),
    }


def shard_names(path: Path, shards: int) -> list[Path]:
    """`<dir>/<stem>.s{i}.pth` for the web demo's sharded layout of `path`."""
    stem = path.name[: -len(".pth")] if path.name.endswith(".pth") else path.name
    return [path.with_name(f"{stem}.s{i}.pth") for i in range(shards)]


def _split_evenly(sd: dict[str, torch.Tensor], shards: int) -> list[dict[str, torch.Tensor]]:
    """Greedy by size: each key into the currently lightest shard (deterministic)."""
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    sizes = [0] * shards
    for key in sorted(sd, key=lambda k: (-sd[k].numel(), k)):
        i = sizes.index(min(sizes))
        parts[i][key] = sd[key]
        sizes[i] += sd[key].numel() * sd[key].element_size()
    return [dict(sorted(p.items())) for p in parts]


def _save_torchscript_clip(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A TorchScript archive whose state dict has `tensors` (like OpenAI's ViT-L-14.pt)."""
    root = torch.nn.Module()
    for key, value in tensors.items():
        *mods, leaf = key.split(".")
        node = root
        for name in mods:
            if not hasattr(node, name):
                node.add_module(name, torch.nn.Module())
            node = getattr(node, name)
        node.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(root).save(str(path))


def save_random_checkpoint(
    cfg: ModelConfig,
    path: str | os.PathLike,
    seed: int = 0,
    dtype: str | torch.dtype = torch.float32,
    shards: int = 1,
    with_clip: bool = True,
    text_tower: bool = False,
    clip_path: str | os.PathLike | None = None,
    clip_style: str = "openai",
    modalities: tuple[str, ...] | None = None,
) -> list[Path]:
    """Write a seeded random model in the release's key format; returns the files written.

    path: the single-file name (`.../consolidated.00-of-01.pth`); with `shards > 1` the
      files are `<stem>.s0.pth ... <stem>.s{shards-1}.pth` beside it instead.
    with_clip: keep `clip.visual.*` in the checkpoint. Without it, `clip_path` (if given)
      receives the visual tower in `clip_style`: "openai" (`visual.*` plus text-tower
      keys, a plain state dict), "open_clip" ({"state_dict": {"module.visual.*": ...}},
      like an open_clip training checkpoint) or "torchscript" (an archive like OpenAI's
      `ViT-L-14.pt`).
    text_tower: add CLIP text-tower leftovers (`llma.clip.token_embedding.weight`, ...),
      which the loader must ignore.
    modalities: keep only these modalities' weights (a partial checkpoint); default all.
    """
    path = Path(path)
    if shards < 1:
        raise CheckpointError(f"shards must be >= 1, got {shards}")
    if clip_style not in CLIP_STYLES:
        raise CheckpointError(f"unknown clip_style {clip_style!r}; known: {', '.join(CLIP_STYLES)}")
    target = parse_dtype(dtype)
    sd = random_state_dict(cfg, seed, target)
    if modalities is not None:
        from .checkpoint import key_modality

        sd = {k: v for k, v in sd.items() if key_modality(k) in (None, *modalities)}
    visual = {k: v for k, v in sd.items() if k.startswith(CLIP_VISUAL)}
    if not with_clip:
        sd = {k: v for k, v in sd.items() if not k.startswith(CLIP_VISUAL)}
    if text_tower and with_clip:
        sd.update(clip_text_tower(cfg, seed, target))
    official = {PREFIX + k: v for k, v in sd.items()}

    path.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if shards == 1:
        torch.save(official, path)
        written.append(path)
    else:
        for name, part in zip(shard_names(path, shards), _split_evenly(official, shards)):
            torch.save(part, name)
            written.append(name)

    if not with_clip and clip_path is not None:
        clip_path = Path(clip_path)
        clip_path.parent.mkdir(parents=True, exist_ok=True)
        openai = {k[len("clip."):]: v for k, v in visual.items()}
        if clip_style == "openai":
            openai.update({k[len("clip."):]: v for k, v in clip_text_tower(cfg, seed, target).items()})
            torch.save(openai, clip_path)
        elif clip_style == "open_clip":
            torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in openai.items()}}, clip_path)
        else:
            _save_torchscript_clip(openai, clip_path)
        written.append(clip_path)
    log.info("wrote random %s checkpoint (seed %d): %s", cfg.name, seed, ", ".join(map(str, written)))
    return written


# --------------------------------------------------------------------------- streamed synthesis


_STORAGE_TYPES = {torch.float32: torch.FloatStorage, torch.float16: torch.HalfStorage,
                  torch.bfloat16: torch.BFloat16Storage}


class _StorageRef:
    """Where one tensor's bytes will be in the archive (`data/<key>`), for the pickle."""

    def __init__(self, key: str, numel: int, dtype: torch.dtype) -> None:
        self.key, self.numel = key, numel
        self.storage_type = _STORAGE_TYPES[dtype]


class _TensorStub:
    """Pickles as a contiguous CPU tensor over a `_StorageRef`, as `torch.save` writes one."""

    def __init__(self, ref: _StorageRef, shape: tuple[int, ...]) -> None:
        self.ref, self.shape = ref, shape

    def __reduce_ex__(self, protocol):
        stride, acc = [], 1
        for n in reversed(self.shape):
            stride.append(acc)
            acc *= n
        return (torch._utils._rebuild_tensor_v2,
                (self.ref, 0, self.shape, tuple(reversed(stride)), False, collections.OrderedDict()))


class _StubPickler(pickle.Pickler):
    def persistent_id(self, obj):  # the tuple torch.save's own pickler writes for a storage
        if isinstance(obj, _StorageRef):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def stream_random_checkpoint(
    cfg: ModelConfig,
    path: str | os.PathLike,
    seed: int = 0,
    dtype: str | torch.dtype = torch.float16,
    modalities: tuple[str, ...] | None = None,
) -> Path:
    """`save_random_checkpoint(cfg, path, seed, dtype, modalities=...)` (one file, CLIP inside),
    written one tensor at a time; returns the path.

    Same values: the model is built on the meta device, and every parameter is drawn in
    `init_random_weights`' order from one generator (fp32 normal * 0.02, then cast), norms
    1 / 0, so `torch.load` gives tensors equal to the in-RAM function's. Not the same bytes:
    the archive's records are in drawing order. Peak memory is the largest tensor in fp32
    plus its cast (about 0.8 GB at 7B), not the model (27 GB fp32 at 7B). The pickle is
    written first from shapes alone (as `torch.save` would write it), then each tensor's
    bytes as a stored zip record aligned to 64 bytes like torch's (`_ZipRecords`; torch's
    own writer keeps every record it wrote in RAM until the end). Written to
    `<path>.partial` and renamed when complete.
    """
    from .checkpoint import key_modality
    from .model import OneLLM, is_norm_module

    path = Path(path)
    target = parse_dtype(dtype)
    with torch.device("meta"):
        model = OneLLM(cfg)
    fills: dict[str, float] = {}
    for mname, module in model.named_modules():
        if is_norm_module(module):
            fills[f"{mname}.weight"] = 1.0
            if getattr(module, "bias", None) is not None:
                fills[f"{mname}.bias"] = 0.0
    params = dict(model.named_parameters())
    extra = [k for k in model.state_dict() if k not in params]
    if extra:
        raise CheckpointError(f"{cfg.name}: state dict entries that are not parameters cannot be streamed: {extra[:3]}")
    keep = [k for k in model.state_dict()
            if modalities is None or key_modality(k) in (None, *modalities)]
    refs = {k: _StorageRef(str(i), params[k].numel(), target) for i, k in enumerate(keep)}
    buf = io.BytesIO()
    _StubPickler(buf, protocol=2).dump({PREFIX + k: _TensorStub(refs[k], tuple(params[k].shape)) for k in keep})
    data = buf.getvalue()

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    gen = torch.Generator().manual_seed(seed)
    try:
        with _ZipRecords(tmp, "archive") as writer:  # a fixed name: the same seed gives the same bytes
            _write_records(writer, data, params, fills, refs, gen, target)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("streamed random %s checkpoint (seed %d, %s): %s", cfg.name, seed, target, path)
    return path


def _write_records(writer: _ZipRecords, data: bytes, params, fills, refs, gen, target) -> None:
    from .model import STD_INIT

    writer.add("data.pkl", data)
    writer.add(".format_version", b"1")
    writer.add(".storage_alignment", b"64")
    writer.add("byteorder", sys.byteorder.encode())
    with torch.no_grad():
        for name, p in params.items():  # init_random_weights' order: norms skip the generator
            if name in fills:
                t = torch.full(p.shape, fills[name], dtype=target)
            else:
                t = torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(STD_INIT).to(target)
            if name in refs:
                writer.add(f"data/{refs[name].key}", t.reshape(-1).view(torch.uint8).numpy())
            del t
    writer.add("version", b"3\n")  # torch's reader requires it (torch's writer adds it last)


class _ZipRecords:
    """A torch.save-style zip archive written record by record: stored (uncompressed), each
    record's data starting on a 64-byte boundary (padding in an extra field, as torch's
    writer does), so `torch.load(mmap=True)` maps the tensors in place."""

    ALIGN = 64

    def __init__(self, path: Path, archive: str) -> None:
        import zipfile

        self._zipfile = zipfile
        self.zf = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.archive = archive

    def add(self, name: str, data) -> None:
        import struct

        zf = self._zipfile
        arcname = f"{self.archive}/{name}"
        info = zf.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zf.ZIP_STORED
        view = memoryview(data).cast("B")
        info.file_size = view.nbytes
        start = self.zf.fp.tell() + 30 + len(arcname.encode()) + 4  # local header, name, extra-field header
        pad = -start % self.ALIGN
        info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        with self.zf.open(info, "w") as fh:
            fh.write(view)

    def __enter__(self) -> _ZipRecords:
        return self

    def __exit__(self, *exc) -> None:
        self.zf.close()


# --------------------------------------------------------------------------- tokenizer

# Our own small English corpus: the v1 prompt and evaluation questions, plus plain
# descriptions of the kinds of things the eight modalities show, so prompts and answers
# tokenise into word-like pieces.
CORPUS = """\
A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.
###Human: Provide a one-sentence caption for the provided image.
###Assistant: A dog runs across a green field with a red ball in its mouth.
###Human: Provide a one-sentence caption for the provided audio.
###Assistant: A man is speaking while birds sing in the background.
###Human: Provide a one-sentence caption for the provided fMRI data.
###Assistant: A plate of food sits on a wooden table next to a cup of coffee.
###Human: What is this?
###Assistant: This is a 3D model of a wooden chair with four legs.
###Human: Describe the scene.
###Assistant: The person is walking down the stairs while holding a phone.
###Human: What is the man doing in the video?
Answer the question using a single word or phrase.
###Assistant: Cooking.
###Human: What color is the car in the picture?
###Assistant: The car is blue.
###Human: How many people are in the room?
###Assistant: There are three people in the room, two of them are sitting on the sofa.
###Human: What can you hear in this recording?
###Assistant: I can hear rain falling on a roof and a car passing by on the street.
###Human: Describe the depth map and the photo together.
###Assistant: A kitchen with a table in the front and a window at the back of the room.
###Human: What does the surface normal map show?
###Assistant: The normal map shows a bed, a lamp and a wall with a large painting.
A cat is sleeping on a soft chair near the window in the afternoon sun.
Two children are playing football in the park while their parents watch.
A woman is riding a bicycle along a river on a sunny day.
A large white boat sails on the blue sea under a clear sky.
A group of people stand in front of an old stone building in the city.
A train arrives at the station and passengers wait on the platform.
A bowl of fruit with apples, bananas and oranges is on the kitchen counter.
A man plays the guitar and sings a song to a small crowd.
A baby laughs while a dog barks loudly in the next room.
The engine of a motorcycle starts and the sound grows louder.
Water is running from a tap and someone is washing dishes.
People are talking and laughing at a busy restaurant.
An airplane flies overhead and the wind is blowing through the trees.
A bell rings three times and then the music begins.
The point cloud shows a lamp with a round shade and a thin metal stand.
This is an airplane with two wings and a long body.
This is a table with a flat top, and a vase of flowers stands on it.
This object is a guitar made of brown wood.
The person is running, then stops and sits down on a bench.
The person is cooking food in the kitchen and opens the fridge.
Someone is climbing the stairs, turning left, and opening a door.
The hands move up and down as the person cleans the window.
The brain activity suggests the subject is looking at a giraffe standing in the grass.
A picture of a bathroom with a white sink, a mirror and a towel.
A street at night with bright lights, cars and tall buildings.
A close view of a pizza with cheese, tomato and green leaves.
A person holding an umbrella walks in the snow near a red bus.
The video shows a girl dancing on a stage in a long yellow dress.
First the man opens the box, then he takes out a small black camera.
The answer is yes. The answer is no. The answer is two. The answer is red.
One, two, three, four, five, six, seven, eight, nine, ten.
0 1 2 3 4 5 6 7 8 9 10 12 15 20 24 30 32 100 224 400 1024 2048
Image, video, audio, point cloud, depth, normal, IMU and fMRI are the eight modalities.
It is a photo of a mountain lake with trees and a small wooden house.
There is a horse eating grass in a field behind a white fence.
The sky is grey and it looks like it will rain soon.
Is there a person in the image? Yes, there is a person wearing a hat.
What is on the table? There is a laptop, a book and a glass of water.
Where is this? This is a beach with sand, waves and a few palm trees.
Why is the man smiling? He is happy because he won the game.
The quick brown fox jumps over the lazy dog.
She said hello, and he answered with a friendly wave of his hand.
We should see the results of the test in a few minutes, not hours.
The model reads the input, thinks for a moment, and then writes an answer.
"""


def train_tiny_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 512) -> Path:
    """Train a LLaMA-like SentencePiece BPE model on `CORPUS`; returns its path.

    unk 0, bos 1, eos 2, no pad, byte fallback, digits split, no text normalisation
    (like LLaMA's). Deterministic: the same vocab_size gives a byte-identical file.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=1.0,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise CheckpointError(
            f"could not train a {vocab_size}-piece tokenizer on the built-in corpus: {str(exc).strip()[:200]}"
        ) from None
    path = out / TOKENIZER_FILE
    path.write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(path))
    if sp.vocab_size() != vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {sp.vocab_size()} pieces, wanted {vocab_size}")
    log.info("trained %d-piece tokenizer: %s", vocab_size, path)
    return path
