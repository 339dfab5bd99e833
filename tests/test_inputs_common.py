"""Every registered modality: example file, dummy input, shared bad-input rules, no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from _inputs_helpers import EXAMPLES, REPO
from onellm.runtime.errors import InputError
from onellm.runtime.modalities import all_modalities, example_file, example_inputs, get_modality


def _example(name: str) -> tuple[str, dict[str, str]]:
    """(example file relative to examples/, reader options) as the modality's spec declares them."""
    spec = get_modality(name)
    inputs = example_inputs(name)
    return spec.example.path, {k: v for k, v in inputs.items() if k != spec.input_name}


# modality -> (example file, options)
EXAMPLE_INPUTS = {name: _example(name) for name in all_modalities()}


def test_every_modality_has_an_example() -> None:
    for name, spec in all_modalities().items():
        assert (EXAMPLES / spec.example.path).is_file(), name
        assert example_file(name) == EXAMPLES / spec.example.path


def test_the_docs_list_every_example() -> None:
    """examples/README.md and docs/preview/README.md name each modality's example as its spec does."""
    table = (EXAMPLES / "README.md").read_text()
    previews = (REPO / "docs" / "preview" / "README.md").read_text()
    for name, spec in all_modalities().items():
        assert f"| {name} | `{spec.example.path}` |" in table, name
        assert f"`onellm preview {spec.cli_option} examples/{spec.example.path}" in previews, name


@pytest.mark.parametrize("name", [n for n, s in all_modalities().items() if s.example.synthesize])
def test_stand_in_examples_read_to_the_encoder_shape(name, tmp_path, monkeypatch) -> None:
    """Without examples/ (an installed package) the modalities that have a stand-in write one."""
    import onellm.runtime.modalities.base as base

    monkeypatch.setattr(base, "examples_dir", lambda: None)
    spec = get_modality(name)
    inputs = example_inputs(name, stand_ins=tmp_path)
    assert inputs == {spec.input_name: str(tmp_path / spec.example.path)}
    r = spec.preprocess(inputs[spec.input_name])
    assert r.array.shape == spec.input_shape and np.isfinite(r.array).all()
    assert example_inputs(name) is None  # no folder for stand-ins: nothing to offer


@pytest.mark.parametrize("name", sorted(EXAMPLE_INPUTS))
def test_example_reads_to_the_encoder_shape(name) -> None:
    spec = get_modality(name)
    rel, opts = EXAMPLE_INPUTS[name]
    r = spec.preprocess(EXAMPLES / rel, **opts)
    assert r.modality == name
    assert r.array.shape == spec.input_shape and r.array.dtype == np.dtype(spec.input_dtype)
    assert r.array.flags.c_contiguous and np.isfinite(r.array).all()
    json.dumps(r.meta)  # --json output
    assert r.meta["source"] == str(EXAMPLES / rel)


@pytest.mark.parametrize("name", sorted(EXAMPLE_INPUTS))
def test_dummy_input_is_realistic(name) -> None:
    spec = get_modality(name)
    x = spec.dummy_input(np.random.default_rng(0))
    assert x.shape == spec.input_shape and x.dtype == np.dtype(spec.input_dtype) and np.isfinite(x).all()
    if spec.tokenizer_kind == "clip_patch":  # CLIP-normalised pixels in [0, 1]
        assert x.min() >= (0 - 0.49) / 0.26 - 1e-3 and x.max() <= (1 - 0.40) / 0.26 + 1e-3
    if name == "point":
        assert np.sqrt((x[:, :3] ** 2).sum(1)).max() == pytest.approx(1.0, abs=1e-5)
        assert x[:, 3:].min() >= 0 and x[:, 3:].max() <= 1
    if name == "audio":
        assert -2 < x.min() and x.max() < 2


@pytest.mark.parametrize("name", sorted(EXAMPLE_INPUTS))
def test_missing_empty_directory_and_wrong_content(tmp_path, name) -> None:
    spec = get_modality(name)
    opts = dict(EXAMPLE_INPUTS[name][1])
    ext = spec.file_types[0]
    cases = {
        tmp_path / f"missing{ext}": "no such file",
        tmp_path: "a directory",
    }
    (tmp_path / f"empty{ext}").write_bytes(b"")
    cases[tmp_path / f"empty{ext}"] = "empty file"
    (tmp_path / f"words{ext}").write_text("The quick brown fox.\n")
    cases[tmp_path / f"words{ext}"] = "expected"
    (tmp_path / f"zip{ext}").write_bytes(b"PK\x03\x04" + b"\x00" * 200)
    cases[tmp_path / f"zip{ext}"] = "expected"
    for path, found in cases.items():
        with pytest.raises(InputError, match=found) as e:
            spec.preprocess(path, **opts)
        msg = str(e.value)
        assert msg.startswith(str(path)) and "expected" in msg and "found" in msg and "\n" not in msg


def test_readers_run_without_torch() -> None:
    """The runtime's readers never import torch (house style: a user without torch)."""
    code = f"""
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == 'torch' or name.startswith('torch.'):
            raise ImportError('torch is blocked in this test')
sys.meta_path.insert(0, NoTorch())  # any `import torch` now fails
from onellm.runtime.modalities import all_modalities
from pathlib import Path
ex = Path({str(EXAMPLES)!r})
inputs = {{k: (str(ex / v[0]), {{kk: str(vv) for kk, vv in v[1].items()}}) for k, v in {EXAMPLE_INPUTS!r}.items()}}
for name, spec in all_modalities().items():
    src, opts = inputs[name]
    assert spec.preprocess(src, **opts).array.shape == spec.input_shape
assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules)
print('ok')
"""
    code = code.replace("PosixPath(", "str(")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_examples_are_small_and_regenerable() -> None:
    files = [p for p in EXAMPLES.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert sum(p.stat().st_size for p in files) < 2 * 1024 * 1024
    assert (EXAMPLES / "make_examples.py").is_file()
