"""runtime/inputs.py and runtime/embeddings.py: input selection, reader options, stdin, output checks."""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from onellm.runtime import inputs
from onellm.runtime.embeddings import (check_embeddings, embeddings_meta, load_embeddings, save_embeddings,
                                       sidecar_path)
from onellm.runtime.errors import ConfigError, InputError, OutputError
from onellm.runtime.inputs import (Selection, check_out_dir, check_out_file, check_source, reader_options,
                                   select_input, sniff_format)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


# ------------------------------------------------------------------ selection


def test_select_one_modality_and_photo_pairs():
    assert select_input({"imu": "a.csv", "image": None}) == Selection("imu", "a.csv", None)
    assert select_input({"image": "p.jpg"}) == Selection("image", "p.jpg", None)
    assert select_input({}) == Selection(None)
    assert select_input({"depth": "d.png", "image": "p.jpg"}) == Selection("rgbd", "d.png", "p.jpg")
    assert select_input({"rgbn": "n.png", "image": "p.jpg"}) == Selection("rgbn", "n.png", "p.jpg")


@pytest.mark.parametrize("given, words", [
    ({"imu": "a.csv", "image": "b.jpg"}, "--imu does not take an --image"),
    ({"imu": "a.csv", "audio": "b.wav"}, "found --imu and --audio"),
    ({"rgbd": "d.png"}, "no --image"),
    ({"imu": "-", "image": "-"}, "standard input (-) for one input only"),
])
def test_illegal_combinations_are_refused(given, words):
    with pytest.raises(InputError) as err:
        select_input(given)
    assert words in str(err.value)


def test_embeddings_refuse_an_input_file():
    assert select_input({"imu": None}, embeddings=True) == Selection(None)
    with pytest.raises(InputError, match="--embeddings: expected no input file.*found --imu"):
        select_input({"imu": "a.csv"}, embeddings=True)


def test_unknown_modality_keyword_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known modalities: image"):
        select_input({"smell": "x"})


# ------------------------------------------------------------------ reader options


def test_reader_options_merge_flags_and_free_keys():
    flags = [("--imu-rate", "imu", "rate", 100.0), ("--audio-start", "audio", "start", None)]
    assert reader_options("imu", {"start": 1.0}, flags) == {"start": 1.0, "rate": 100.0}


def test_flag_for_another_modality_is_refused():
    with pytest.raises(InputError, match=r"--audio-start: expected an --audio input to apply to, found the input is --imu"):
        reader_options("imu", {}, [("--audio-start", "audio", "start", 3.0)])
    with pytest.raises(InputError, match="--imu-rate: .*found no input file"):
        reader_options(None, {}, [("--imu-rate", "imu", "rate", 50.0)])


def test_unknown_reader_option_lists_the_readers_keys():
    with pytest.raises(InputError) as err:
        reader_options("imu", {"speed": 2.0, "rate": 50.0})
    msg = str(err.value)
    assert msg.startswith("--reader-option: expected an option of the imu reader (")
    assert "rate" in msg and "start" in msg and "accel_units" in msg and msg.endswith("found speed")
    assert "image" not in inputs.reader_parameters("rgbd")  # the photo is not a reader option


# ------------------------------------------------------------------ input paths


def test_check_source_missing_directory_and_unreadable(tmp_path, monkeypatch):
    with pytest.raises(InputError, match=r"nope\.csv: expected a readable imu file \(--imu\), found no such file$"):
        check_source(str(tmp_path / "nope.csv"), "--imu", "imu")
    with pytest.raises(InputError, match="its directory .* does not exist"):
        check_source(str(tmp_path / "gone" / "a.csv"), "--imu", "imu")
    with pytest.raises(InputError, match="found a directory"):
        check_source(str(tmp_path), "--audio", "audio")
    assert check_source(str(tmp_path), "--imu", "imu") == tmp_path  # an IMU export folder is a source
    f = tmp_path / "a.csv"
    f.write_text("t,ax\n")
    real_open = open

    def deny(path, *a, **k):
        if str(path) == str(f):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(InputError, match=r"a\.csv: expected a readable imu file \(--imu\), found permission denied \(EACCES\)"):
        check_source(str(f), "--imu", "imu")


@pytest.mark.parametrize("head, modality, suffix, name", [
    (b"RIFF\x00\x00\x00\x00WAVEfmt ", "audio", ".wav", "wav"),
    (b"RIFX\x00\x00\x00\x00WAVEfmt ", "audio", ".wav", "wav"),
    (b"fLaC\x00\x00", "audio", ".flac", "flac"),
    (b"OggS\x00\x02", "audio", ".ogg", "ogg"),
    (b"ID3\x04\x00", "audio", ".mp3", "mp3"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", "image", ".jpg", "jpeg"),
    (b"\x89PNG\r\n\x1a\n\x00", "image", ".png", "png"),
    (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image", ".webp", "webp"),
    (b"BM\x00\x00\x00\x00", "image", ".bmp", "bmp"),
    (b"\x00\x00\x00\x18ftypisom", "video", ".mp4", "mp4"),
    (b"\x00\x00\x00\x14ftypqt  ", "video", ".mov", "mov"),
    (b"\x93NUMPY\x01\x00", "fmri", ".npy", "npy"),
    (b"ply\nformat ascii 1.0\n", "point", ".ply", "ply"),
    (b"# .PCD v0.7\nVERSION 0.7\n", "point", ".pcd", "pcd"),
    (b"0.1 0.2 0.3\n", "point", ".xyz", "text"),
    (b"time,ax,ay,az,gx,gy,gz\n0,1,2,3,4,5,6\n", "imu", ".csv", "text"),
])
def test_sniff_format_from_magic_bytes(head, modality, suffix, name):
    assert sniff_format(head, modality) == (suffix, name)


def test_sniff_refuses_content_of_another_modality():
    with pytest.raises(InputError, match=r"<stdin>: expected imu data .* found a PNG image"):
        sniff_format(b"\x89PNG\r\n\x1a\n\x00", "imu")
    with pytest.raises(InputError, match="found no data"):
        sniff_format(b"", "audio")


def test_read_stdin_keeps_the_bytes_and_removes_its_file():
    data = (EXAMPLES / "imu" / "walk.csv").read_bytes()
    src = inputs.read_stdin("imu", io.BytesIO(data))
    path = Path(os.fspath(src))
    assert path.suffix == ".csv" and path.read_bytes() == data
    assert src.facts == {"source": "<stdin>", "format": "text", "bytes": len(data)}
    assert check_source(src, "--imu", "imu") is src
    src.close()
    assert not path.exists()


def test_read_stdin_refuses_a_terminal():
    class Tty(io.BytesIO):
        def isatty(self):
            return True

    with pytest.raises(InputError, match="piped in.*found a terminal"):
        inputs.read_stdin("imu", Tty(b""))


# ------------------------------------------------------------------ outputs


def _inject(monkeypatch, code: int, under: Path):
    """os.open raises `code` for paths under `under` (how tempfile creates its files)."""
    real = os.open

    def fake(path, *a, **k):
        if str(path).startswith(str(under)):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "open", fake)


@pytest.mark.parametrize("code, words", [
    (errno.EACCES, "permission denied (EACCES)"),
    (errno.EROFS, "read-only file system (EROFS)"),
    (errno.ENOSPC, "no space left on device (disk full) (ENOSPC)"),
])
def test_out_checks_report_os_faults(tmp_path, monkeypatch, code, words):
    _inject(monkeypatch, code, tmp_path)
    with pytest.raises(OutputError) as err:
        check_out_file(tmp_path / "emb.npz", force=False)
    assert str(err.value) == f"{tmp_path}: cannot write into the directory: {words}"
    with pytest.raises(OutputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_out_dir(tmp_path / "new" / "bundle")


def test_out_checks_find_files_in_the_way_and_missing_parents(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="a file in the way at"):
        check_out_file(blocker / "emb.npz", force=True)
    with pytest.raises(InputError, match="a file in the way at"):
        check_out_dir(blocker / "sub" / "bundle")
    with pytest.raises(InputError, match="found a file in the way$"):
        check_out_dir(blocker)
    with pytest.raises(InputError, match="a directory in the way"):
        check_out_file(tmp_path, force=True)
    with pytest.raises(InputError, match="found no directory"):
        check_out_file(tmp_path / "missing" / "emb.npz", force=False)
    with pytest.raises(InputError, match="--force"):
        check_out_file(blocker, force=False)
    assert check_out_file(blocker, force=True) == blocker
    assert check_out_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # checking creates nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # and leaves no probe behind


# ------------------------------------------------------------------ embeddings files


def _manifest(n_embd: int = 8, sha: str = "ab" * 32):
    """The manifest fields the embeddings checks read (a stand-in for the typed Manifest)."""
    from types import SimpleNamespace

    return SimpleNamespace(n_embd=n_embd, n_inserted=4, source=SimpleNamespace(sha256=sha), preset="t")


MANIFEST = _manifest()


@pytest.mark.parametrize("name", ["emb.npz", "emb.npy"])
def test_embeddings_round_trip_with_metadata(tmp_path, name):
    block = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    meta = embeddings_meta(MANIFEST, "imu", "fp32", {"source": "walk.csv"})
    written = save_embeddings(tmp_path / name, block, meta)
    assert written[0] == tmp_path / name
    if name.endswith(".npy"):
        assert written[1] == sidecar_path(tmp_path / name)
        assert np.array_equal(np.load(tmp_path / name), block)  # still a plain .npy for numpy users
    got, got_meta = load_embeddings(tmp_path / name)
    assert np.array_equal(got, block) and got_meta == json.loads(json.dumps(meta))
    arr, modality = check_embeddings(got, MANIFEST, meta=got_meta)
    assert modality == "imu" and arr.dtype == np.float32
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_embeddings_mismatches_are_refused(tmp_path):
    block = np.zeros((4, 8), np.float32)
    meta = embeddings_meta(MANIFEST, "audio")
    with pytest.raises(InputError, match="expected --modality audio .* found --modality imu"):
        check_embeddings(block, MANIFEST, modality="imu", meta=meta)
    other = _manifest(sha="cd" * 32)
    with pytest.raises(InputError, match="one from another model"):
        check_embeddings(block, other, meta=meta)
    wider = _manifest(n_embd=16)
    with pytest.raises(InputError, match=r"\[4, 16\] for this bundle, found one made for \[4, 8\]"):
        check_embeddings(np.zeros((4, 16), np.float32), wider, meta=meta)
    with pytest.raises(InputError, match="--modality"):
        check_embeddings(block, MANIFEST)  # a bare array needs its modality
    assert check_embeddings(block, MANIFEST, modality="imu")[1] == "imu"
    with pytest.raises(InputError, match="NaN"):
        check_embeddings(np.full((4, 8), np.nan, np.float32), MANIFEST, modality="imu")


def test_bare_npy_has_no_metadata_and_junk_is_refused(tmp_path):
    np.save(tmp_path / "bare.npy", np.zeros((4, 8), np.float32))
    assert load_embeddings(tmp_path / "bare.npy")[1] is None
    (tmp_path / "junk.npy").write_text("hello")
    with pytest.raises(InputError, match=r"junk\.npy: expected an embeddings file .* found text"):
        load_embeddings(tmp_path / "junk.npy")
    with pytest.raises(InputError, match="found no such file"):
        load_embeddings(tmp_path / "none.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(InputError, match="an .npz with arrays x"):
        load_embeddings(tmp_path / "other.npz")
