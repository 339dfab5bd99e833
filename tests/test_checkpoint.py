"""Checkpoint loading: the release's key format, shards, CLIP sources, dtypes, errors, mmap."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from onellm.ref.checkpoint import (  # noqa: E402
    SINGLE_FILE,
    find_checkpoint_files,
    load_model,
    open_checkpoint,
)
from onellm.ref.testing import save_random_checkpoint, shard_names  # noqa: E402
from onellm.runtime.errors import CheckpointError  # noqa: E402

SEED = 7


@pytest.fixture(scope="module")
def small_config(tiny_config):
    """tiny with two modalities: cheap checkpoints (no 15724-wide fMRI layer)."""
    return dataclasses.replace(tiny_config, name="tiny-image-imu", modalities=("image", "imu"))


@pytest.fixture(scope="module")
def small_checkpoint(small_config, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small") / SINGLE_FILE
    save_random_checkpoint(small_config, path, seed=SEED)
    return path


@pytest.fixture(scope="module")
def small_saved(small_checkpoint) -> dict:
    """The small checkpoint read plainly (no mmap), prefix kept."""
    return torch.load(small_checkpoint, weights_only=True, map_location="cpu")


def _assert_equal_to_saved(model, saved: dict, dtype=None) -> None:
    state = model.state_dict()
    assert set(state) == {k.removeprefix("llma.") for k in saved if not _is_text_tower(k)}
    for key, value in saved.items():
        name = key.removeprefix("llma.")
        if _is_text_tower(name):
            continue
        expected = value if dtype is None else value.to(dtype)
        assert state[name].dtype == expected.dtype, name
        assert torch.equal(state[name], expected), name


def _is_text_tower(name: str) -> bool:
    from onellm.ref.checkpoint import is_ignored_key

    return is_ignored_key(name.removeprefix("llma."))


def _write_variant(saved: dict, tmp_path: Path, edit) -> Path:
    sd = dict(saved)
    edit(sd)
    path = tmp_path / SINGLE_FILE
    torch.save(sd, path)
    return path


# ------------------------------------------------------------------ roundtrip and layout


def test_roundtrip_tiny_params_equal_saved(tiny_config, tiny_checkpoint, tiny_model):
    saved = torch.load(tiny_checkpoint, weights_only=True, map_location="cpu")
    assert all(k.startswith("llma.") for k in saved)
    _assert_equal_to_saved(tiny_model, saved)
    assert not tiny_model.training
    assert not any(p.requires_grad for p in tiny_model.parameters())


def test_report_counts(small_config, small_checkpoint, small_saved):
    _, report = load_model(small_config, small_checkpoint)
    assert report.n_tensors == len(small_saved)
    assert report.n_params == sum(v.numel() for v in small_saved.values())
    assert report.clip_source == "checkpoint"
    assert report.cast_tensors == 0 and report.cast_bytes == 0
    assert report.source_dtypes == {"fp32": len(small_saved)}
    assert report.files == (str(small_checkpoint),)
    assert "memory-mapped" in report.summary()


def test_open_checkpoint_strips_prefix(small_checkpoint, small_saved):
    sd = open_checkpoint(small_checkpoint)
    assert set(sd) == {k[len("llma."):] for k in small_saved}


def test_wrapped_in_model_key(small_config, small_saved, tmp_path):
    path = tmp_path / "wrapped.pth"
    torch.save({"model": small_saved, "epoch": 3}, path)
    model, _ = load_model(small_config, path)
    _assert_equal_to_saved(model, small_saved)


def test_ten_shards_one_shard_dir_or_list(small_config, small_saved, tmp_path):
    single = tmp_path / SINGLE_FILE
    files = save_random_checkpoint(small_config, single, seed=SEED, shards=10)
    assert [f.name for f in files] == [f"consolidated.00-of-01.s{i}.pth" for i in range(10)]
    assert not single.exists()
    for arg in (files[3], tmp_path, list(reversed(files))):
        model, report = load_model(small_config, arg)
        assert report.files == tuple(map(str, files))
        _assert_equal_to_saved(model, small_saved)


def test_missing_shard_is_named(small_config, tmp_path):
    files = save_random_checkpoint(small_config, tmp_path / SINGLE_FILE, seed=SEED, shards=10)
    files[4].unlink()
    with pytest.raises(CheckpointError, match=r"missing consolidated\.00-of-01\.s4\.pth"):
        find_checkpoint_files(files[0])


def test_overlapping_shards_rejected(small_saved, tmp_path):
    names = shard_names(tmp_path / SINGLE_FILE, 2)
    keys = sorted(small_saved)
    torch.save({k: small_saved[k] for k in keys[:10]}, names[0])
    torch.save({k: small_saved[k] for k in keys[5:]}, names[1])
    with pytest.raises(CheckpointError, match="disjoint"):
        open_checkpoint(names[0])


# ------------------------------------------------------------------ strictness


def test_missing_key_is_named(small_config, small_saved, tmp_path):
    path = _write_variant(small_saved, tmp_path, lambda sd: sd.pop("llma.layers.1.feed_forward.w2.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing: layers\.1\.feed_forward\.w2\.weight") as err:
        load_model(small_config, path)
    assert "\n" not in str(err.value)


def test_unexpected_key_is_named(small_config, small_saved, tmp_path):
    path = _write_variant(small_saved, tmp_path, lambda sd: sd.__setitem__("llma.layers.9.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"1 unexpected: layers\.9\.extra\.weight"):
        load_model(small_config, path)


def test_wrong_shape_is_named(small_config, small_saved, tmp_path):
    def edit(sd):
        sd["llma.norm.weight"] = torch.ones(small_config.decoder.dim + 1)

    path = _write_variant(small_saved, tmp_path, edit)
    dim = small_config.decoder.dim
    with pytest.raises(CheckpointError, match=rf"norm\.weight file \[{dim + 1}\] vs model \[{dim}\]"):
        load_model(small_config, path)


def test_many_missing_keys_are_grouped(small_config, small_saved, tmp_path):
    def edit(sd):
        for key in [k for k in sd if k.startswith("llma.layers.")]:
            del sd[key]

    path = _write_variant(small_saved, tmp_path, edit)
    with pytest.raises(CheckpointError) as err:
        load_model(small_config, path)
    msg = str(err.value)
    n_layers = small_config.decoder.n_layers
    assert f"layers.{{0-{n_layers - 1}}}.attention.wq.weight ({n_layers})" in msg
    assert len(msg) < 800 and "\n" not in msg


def test_text_tower_keys_ignored(small_config, small_saved, tmp_path):
    save_random_checkpoint(small_config, tmp_path / SINGLE_FILE, seed=SEED, text_tower=True)
    model, report = load_model(small_config, tmp_path / SINGLE_FILE)
    assert "clip.token_embedding.weight" in report.ignored_keys
    assert "clip.transformer.resblocks.0.attn.in_proj_weight" in report.ignored_keys
    assert "clip.logit_scale" in report.ignored_keys
    _assert_equal_to_saved(model, small_saved)


def test_partial_modalities(tiny_config, small_config, small_checkpoint, small_saved, tmp_path):
    # the image+imu checkpoint cannot serve all eight modalities ...
    with pytest.raises(CheckpointError, match=r"no weights at all for modalities .*audio.*video"):
        load_model(tiny_config, small_checkpoint)
    # ... but a config for just imu loads it, skipping the image weights
    imu_only = dataclasses.replace(small_config, modalities=("imu",))
    model, report = load_model(imu_only, small_checkpoint)
    assert "resample_tokens.image" in report.skipped_keys
    assert "resample_tokens.imu" in model.state_dict()
    assert torch.equal(model.state_dict()["resample_tokens.imu"], small_saved["llma.resample_tokens.imu"])


# ------------------------------------------------------------------ CLIP sources


@pytest.mark.parametrize("style", ["openai", "open_clip", "torchscript"])
def test_clip_from_separate_file(style, small_config, small_saved, tmp_path):
    ckpt, clip = tmp_path / SINGLE_FILE, tmp_path / f"clip-{style}.pt"
    save_random_checkpoint(small_config, ckpt, seed=SEED, with_clip=False, clip_path=clip, clip_style=style)
    assert not any(k.startswith("llma.clip.") for k in torch.load(ckpt, weights_only=True))
    model, report = load_model(small_config, ckpt, clip_checkpoint=clip)
    assert str(clip) in report.clip_source
    assert {"openai": "OpenAI/open_clip", "open_clip": "module.", "torchscript": "TorchScript"}[style] in report.clip_source
    _assert_equal_to_saved(model, small_saved)


def test_clip_absent_asks_for_clip_checkpoint(small_config, tmp_path):
    save_random_checkpoint(small_config, tmp_path / SINGLE_FILE, seed=SEED, with_clip=False)
    with pytest.raises(CheckpointError, match=r"no CLIP visual weights.*--clip-checkpoint.*ViT-L/14"):
        load_model(small_config, tmp_path / SINGLE_FILE)


def test_clip_file_with_wrong_names(small_config, small_saved, tmp_path):
    save_random_checkpoint(small_config, tmp_path / SINGLE_FILE, seed=SEED, with_clip=False)
    hf = tmp_path / "hf.bin"
    torch.save({"vision_model.embeddings.patch_embedding.weight": torch.zeros(1)}, hf)
    with pytest.raises(CheckpointError, match=r"hf\.bin: expected an OpenAI/open_clip .*Hugging Face"):
        load_model(small_config, tmp_path / SINGLE_FILE, clip_checkpoint=hf)


# ------------------------------------------------------------------ dtypes and memory


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_dtype_cast_from_fp32(dtype, small_config, small_checkpoint, small_saved):
    target = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    model, report = load_model(small_config, small_checkpoint, dtype=dtype)
    assert report.dtype == dtype and report.cast_tensors == len(small_saved)
    assert report.cast_bytes == sum(v.numel() for v in small_saved.values()) * 2
    _assert_equal_to_saved(model, small_saved, dtype=target)


def test_fp16_file_as_fp16_copies_nothing(small_config, small_saved, tmp_path):
    save_random_checkpoint(small_config, tmp_path / SINGLE_FILE, seed=SEED, dtype=torch.float16)
    model, report = load_model(small_config, tmp_path / SINGLE_FILE, dtype="fp16")
    assert report.cast_tensors == 0 and report.source_dtypes == {"fp16": len(small_saved)}
    _assert_equal_to_saved(model, small_saved, dtype=torch.float16)
    _, report32 = load_model(small_config, tmp_path / SINGLE_FILE, dtype="fp32")
    assert report32.cast_tensors == len(small_saved)


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    real = os.path.realpath(path)
    spans = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == real:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                spans.append((lo, hi))
    return spans


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_parameters_are_the_mmapped_file(small_config, small_checkpoint):
    model, _ = load_model(small_config, small_checkpoint)
    spans = _file_mappings(small_checkpoint)
    assert spans, "checkpoint file is not memory-mapped"
    outside = [
        name for name, p in model.named_parameters()
        if not any(lo <= p.untyped_storage().data_ptr() < hi for lo, hi in spans)
    ]
    assert outside == []
    # a cast makes real copies, outside the mapping
    model16, _ = load_model(small_config, small_checkpoint, dtype="fp16")
    p = model16.get_parameter("norm.weight")
    assert not any(lo <= p.untyped_storage().data_ptr() < hi for lo, hi in _file_mappings(small_checkpoint))


# ------------------------------------------------------------------ unreadable files


def _one_line_error(path, match):
    with pytest.raises(CheckpointError, match=match) as err:
        open_checkpoint(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_missing_file(tmp_path):
    _one_line_error(tmp_path / "nope.pth", "checkpoint file not found")


def test_empty_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        open_checkpoint(tmp_path)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint\n" * 20)
    _one_line_error(path, "expected a PyTorch checkpoint .*found bytes")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    _one_line_error(path, "found an empty file")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file(keep, small_checkpoint, tmp_path):
    data = small_checkpoint.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: int(len(data) * keep)])
    _one_line_error(path, "truncated or corrupt")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_as_main_checkpoint(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    _one_line_error(path, "found a TorchScript archive")


def test_unknown_dtype(small_config, small_checkpoint):
    with pytest.raises(CheckpointError, match="unknown dtype 'int8'"):
        load_model(small_config, small_checkpoint, dtype="int8")
