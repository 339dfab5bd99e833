"""The typed manifest: strict parsing, round trip, the version-1 migration, and the runtime
reading its facts (prompt template, sampling defaults, encoder stage shapes) from it.

`fixtures/manifest_v1.json` is a real version-1 manifest: the demo bundle that
`onellm ask --imu examples/imu/walk.csv hi` built with the code before the typed
manifest (commit 9a07430), cut down to the imu and point modalities (their graphs and
files only) to keep the fixture small.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from onellm.runtime.errors import BackendError, BundleError
from onellm.runtime.manifest import SCHEMA_VERSION, Manifest, migrate_v1

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _v1() -> dict:
    return json.loads((FIXTURES / "manifest_v1.json").read_text())


def _v2(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _copy_bundle(bundle: Path, dst: Path, edit) -> Path:
    shutil.copytree(bundle, dst)
    data = _v2(dst)
    edit(data)
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


# ---------------------------------------------------------------------------- strict parsing


def test_written_manifest_is_version_2_and_round_trips(tiny_bundle):
    data = _v2(tiny_bundle)
    assert data["schema_version"] == SCHEMA_VERSION == 2
    m = Manifest.from_dict(data)
    assert m.to_dict() == data
    assert Manifest.from_dict(m.to_dict()) == m
    # the tokenizer's special ids were read from the SentencePiece model, not written as literals
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_bundle / m.tokenizer.file))
    assert (m.tokenizer.bos_id, m.tokenizer.eos_id, m.tokenizer.unk_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())


@pytest.mark.parametrize("path", ["decoder.quants.f32.file", "encoder.precisions.fp32.modalities.imu.stages",
                                  "prompt.defaults.top_p", "tokenizer.bos_id", "source"])
def test_from_dict_names_a_missing_key(tiny_bundle, path):
    data = _v2(tiny_bundle)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    del node[last]
    with pytest.raises(BundleError, match=re.escape(f"expected the key '{path}', found none")):
        Manifest.from_dict(data)


@pytest.mark.parametrize("path", ["decoder.quants.f32.colour", "prompt.emoji", "extra",
                                  "encoder.precisions.fp32.graphs.trunk.inputs[0].layout"])
def test_from_dict_names_an_unknown_key(tiny_bundle, path):
    data = _v2(tiny_bundle)
    node = data
    keys = path.replace("[0]", ".0").split(".")
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node[key]
    node[keys[-1]] = 1
    with pytest.raises(BundleError, match=re.escape(f"'{path}' is unknown")):
        Manifest.from_dict(data)


def test_from_dict_rejects_wrong_types_naming_the_key(tiny_bundle):
    data = _v2(tiny_bundle)
    data["decoder"]["quants"]["f32"]["bytes"] = "big"
    with pytest.raises(BundleError, match="'decoder.quants.f32.bytes' expected an integer"):
        Manifest.from_dict(data)
    data = _v2(tiny_bundle)
    data["random_weights"] = 1
    with pytest.raises(BundleError, match="'random_weights' expected bool"):
        Manifest.from_dict(data)
    data = _v2(tiny_bundle)
    data["schema_version"] = 99
    with pytest.raises(BundleError, match="schema version"):
        Manifest.from_dict(data)


# ---------------------------------------------------------------------------- version 1


def test_v1_manifest_migrates_to_the_shapes_version_2_records(tiny_bundle):
    """A real version-1 manifest (fixture) parses; its derived stage shapes equal those the
    current export records for the same preset."""
    v1 = _v1()
    assert v1["schema_version"] == 1 and "_dir" not in v1
    m = Manifest.from_dict(v1, where="fixture")
    assert m.schema_version == SCHEMA_VERSION
    assert m.modalities == ("imu", "point")
    v2 = Manifest.from_dict(_v2(tiny_bundle))
    for mod in ("imu", "point"):
        assert m.encoder.precisions["fp32"].modalities[mod].stages == v2.encoder.precisions["fp32"].modalities[mod].stages
    point = m.encoder.precisions["int8"].modalities["point"]
    assert point.point_grouping is not None and point.stages[0].inputs[0].shape == (1, 1024, 32, 6)
    assert point.stages[-1].outputs[0].shape == (1, 32, 128)
    dec = m.decoder.quants["f32"]
    assert dec.sha256 == v1["files"]["decoder-f32.gguf"]
    assert dec.tolerance == v1["decoder"]["quants"]["f32"]["parity"]["tolerance"] and "tolerance" not in dec.parity
    # the migrated prompt renders exactly what the version-1 runtime rendered
    from onellm.runtime.prompt import Conversation

    conv = Conversation(m.prompt)
    conv.add_question("Is it fast?")
    assert conv.render() == f"{v1['prompt']['system']}\n\n###Human: Is it fast?\n###Assistant:"
    assert Manifest.from_dict(m.to_dict()) == m  # the migrated form is a valid version 2


def test_v1_migration_refuses_what_it_cannot_carry():
    v1 = _v1()
    v1["prompt"]["template"] = "v2-chat"
    with pytest.raises(BundleError, match="template 'v2-chat'"):
        Manifest.from_dict(v1)
    v1 = _v1()
    del v1["decoder"]["quants"]["f32"]["parity"]["tolerance"]
    with pytest.raises(BundleError, match="could not be migrated"):
        migrate_v1(v1)


def test_v1_bundle_on_disk_loads_and_answers(tiny_bundle, tmp_path):
    """Today's cached bundles are version 1: write the tiny bundle's manifest back in the
    version-1 layout and check the runtime loads it and answers the same."""
    from onellm.runtime.decoder import Sampling
    from onellm.runtime.pipeline import Pipeline

    def to_v1(d: dict) -> None:
        d["schema_version"] = 1
        for k in ("header", "turn", "open_turn"):
            del d["prompt"][k]
        for dec in d["decoder"]["quants"].values():
            dec["parity"]["tolerance"] = dec.pop("tolerance")
            del dec["sha256"]
        for v in d["encoder"]["precisions"].values():
            v["schema"] = 1
            for e in v["modalities"].values():
                e["tokenizer_input_shape"] = e["stages"][0]["inputs"][0]["shape"][1:]
                del e["stages"]

    old = _copy_bundle(tiny_bundle, tmp_path / "v1", to_v1)
    walk = str(EXAMPLES / "imu" / "walk.csv")
    with Pipeline.load(old, device="cpu", verify=False) as a, Pipeline.load(tiny_bundle, device="cpu", verify=False) as b:
        assert (a.manifest.encoder, a.manifest.decoder, a.manifest.prompt) == (
            b.manifest.encoder, b.manifest.decoder, b.manifest.prompt)
        ra = a.ask("What is this?", imu=walk, sampling=Sampling.greedy(6))
        rb = b.ask("What is this?", imu=walk, sampling=Sampling.greedy(6))
    assert ra.token_ids == rb.token_ids


# ---------------------------------------------------------------------------- the runtime reads it


def test_runtime_renders_the_prompt_from_the_manifest(tiny_bundle, tmp_path):
    from onellm.runtime.decoder import Sampling
    from onellm.runtime.pipeline import Pipeline

    def edit(d: dict) -> None:
        d["prompt"]["system"] = "You are a terse lab assistant."
        d["prompt"]["turn"] = "<{role}> {message}{sep}"
        d["prompt"]["open_turn"] = "<{role}>"
        d["prompt"]["defaults"]["temperature"] = 0.7
        d["prompt"]["defaults"]["max_new_tokens"] = 3

    changed = _copy_bundle(tiny_bundle, tmp_path / "b", edit)
    seen: list[str] = []
    with Pipeline.load(changed, device="cpu", verify=False) as pipe:
        original = pipe.tokenizer.encode
        pipe.tokenizer.encode = lambda text, **kw: seen.append(text) or original(text, **kw)
        pipe.ask("What is this?", imu=str(EXAMPLES / "imu" / "walk.csv"), sampling=Sampling.greedy(2))
        chat = pipe.chat(imu=str(EXAMPLES / "imu" / "walk.csv"))
        chat.ask("First?", sampling=Sampling.greedy(2))
        first_answer = chat.conversation.messages[1][1]
        chat.ask("Second?", sampling=Sampling.greedy(2))
        defaults = pipe.default_sampling()
    assert seen[0] == "You are a terse lab assistant.\n\n###<Human> What is this?###<Assistant>"
    assert seen[-1] == (f"You are a terse lab assistant.\n\n###<Human> First?###<Assistant> {first_answer}###"
                        "<Human> Second?###<Assistant>")
    assert (defaults.temperature, defaults.max_new_tokens) == (0.7, 3)


def test_token_ids_must_match_the_tokenizer(tiny_bundle, tmp_path):
    from onellm.runtime.pipeline import Pipeline

    bad = _copy_bundle(tiny_bundle, tmp_path / "b", lambda d: d["tokenizer"].update(bos_id=5))
    with pytest.raises(BundleError, match="bos/eos ids 5/"):
        Pipeline.load(bad, device="cpu", verify=False)


def test_encoder_allocates_buffers_from_the_recorded_stage_shapes(tiny_bundle):
    """Change one recorded shape: the encoder's buffers follow it (and onnxruntime refuses)."""
    from onellm.runtime.encoder import Encoder
    from onellm.runtime.modalities import get_modality

    data = _v2(tiny_bundle)["encoder"]["precisions"]["fp32"]
    x = get_modality("imu").dummy_input(np.random.default_rng(0)).astype(np.float32)
    with Encoder(data, tiny_bundle, verify=False) as enc:
        good = np.array(enc.encode("imu", x), copy=True)
        assert enc.feed_shape("imu") == tuple(data["modalities"]["imu"]["stages"][0]["inputs"][0]["shape"])

    wrong = copy.deepcopy(data)
    trunk_out = wrong["modalities"]["imu"]["stages"][1]["outputs"][0]
    trunk_out["shape"][1] += 1  # one token more than the graph writes
    with Encoder(wrong, tiny_bundle, verify=False) as enc, pytest.raises(BackendError, match="onnxruntime failed"):
        enc.encode("imu", x)

    last = copy.deepcopy(data)
    last["modalities"]["imu"]["stages"][-1]["outputs"][0]["shape"] = [1, 31, data["n_embd"]]
    with Encoder(last, tiny_bundle, verify=False) as enc, pytest.raises(BundleError, match="one float32 output"):
        enc.encode("imu", x)
    assert np.isfinite(good).all()


def test_encoder_prepare_and_stage_hook(tiny_bundle):
    from onellm.runtime.bundle import load_manifest
    from onellm.runtime.encoder import Encoder
    from onellm.runtime.modalities import get_modality

    bundle = load_manifest(tiny_bundle, verify=False)
    variant = bundle.manifest.encoder.precisions["fp32"]
    x = get_modality("imu").dummy_input(np.random.default_rng(1)).astype(np.float32)
    with Encoder(variant, bundle.dir, verify=False) as enc:
        assert not enc.is_prepared("imu")
        enc.prepare("imu")
        assert enc.is_prepared("imu") and not enc.is_prepared("audio")
        seen: list[tuple[str, str, float]] = []
        enc.encode("imu", x, stage_hook=lambda m, g, s: seen.append((m, g, s)))
    assert [g for _, g, _ in seen] == list(variant.modalities["imu"].chain)
    assert all(m == "imu" and s >= 0 for m, _, s in seen)
