"""`onellm preview`: a picture of exactly the tensor the encoder gets, for every modality.

The figure is checked by its data, not by its looks: the arrays each matplotlib artist
draws are read back from the figure and compared with `read_input(...).array` (images
de-normalised for display are normalised again). Needs matplotlib (dev extra); no
bundle, no torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("matplotlib")

from onellm.cli import main  # noqa: E402
from onellm.runtime.modalities import all_modalities, example_file, example_inputs  # noqa: E402
from onellm.runtime.modalities._imaging import CLIP_MEAN, CLIP_STD  # noqa: E402
from onellm.runtime.pipeline import read_input  # noqa: E402
from onellm.runtime.preview import DPI, draw_preview, preview_panels  # noqa: E402

PHOTO = str(example_file("image"))


def _example(modality: str) -> tuple[str, list[str]]:
    """(its example file, the CLI arguments that pass it), from the modality's spec."""
    spec = all_modalities()[modality]
    inputs = example_inputs(modality)
    args = [spec.cli_option, inputs[spec.input_name]]
    if spec.requires_image:
        args += ["--image", inputs["image"]]
    return inputs[spec.input_name], args


EXAMPLE = {m: _example(m) for m in all_modalities()}
PANELS = {"image": 1, "video": 15, "audio": 1, "point": 3, "rgbd": 2, "rgbn": 2, "imu": 2, "fmri": 2}


def _read(modality: str, **options):
    image = PHOTO if all_modalities()[modality].requires_image else None
    return read_input(modality, EXAMPLE[modality][0], options, image=image)


def _renormalise(rgb: np.ndarray) -> np.ndarray:
    """A displayed [H,W,3] frame back to the CLIP-normalised [3,H,W] the encoder got."""
    return (rgb.transpose(2, 0, 1) - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None]


def test_every_modality_has_an_example_and_a_layout():
    assert set(EXAMPLE) == set(all_modalities()) == set(PANELS)


@pytest.mark.parametrize("modality", list(EXAMPLE))
def test_the_drawn_data_are_the_reader_array(modality, tmp_path):
    from PIL import Image

    item = _read(modality)
    x = item.array
    fig, layout = draw_preview(item)
    assert len(layout.panels) == PANELS[modality]
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    assert len(axes) == len(layout.panels)
    drawn = []  # the input's array rebuilt from what the artists hold
    for ax, panel in zip(axes, layout.panels):
        assert ax.get_title() == panel.title
        if panel.kind == "lines":
            ys = np.array([line.get_ydata() for line in ax.lines])
            np.testing.assert_array_equal(ys, panel.data["y"])
            np.testing.assert_array_equal(ax.lines[0].get_xdata(), panel.data["x"])
            drawn.append(ys)
        elif panel.kind == "heatmap":
            np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), panel.data["z"])
            drawn.append(np.asarray(ax.images[0].get_array()))
        elif panel.kind == "image":
            rgb = np.asarray(ax.images[0].get_array())
            assert rgb.shape == (224, 224, 3) and rgb.min() >= 0.0 and rgb.max() <= 1.0
            drawn.append(_renormalise(rgb))
        elif panel.kind == "points":
            offsets = np.asarray(ax.collections[0].get_offsets())
            np.testing.assert_array_equal(offsets, panel.data["xy"])
            np.testing.assert_allclose(ax.collections[0].get_facecolors()[:, :3], panel.data["rgb"], atol=1e-7)
            order = panel.data["order"]
            assert sorted(order.tolist()) == list(range(len(x)))  # every point, once
            rows = np.empty_like(offsets)
            rows[order] = offsets
            drawn.append(rows)
        elif panel.kind == "vector":
            drawn.append(np.asarray(ax.lines[0].get_ydata())[None])
    if modality == "imu":
        np.testing.assert_array_equal(np.concatenate(drawn), x)
        assert "m/s²" in axes[0].get_ylabel() and "rad/s" in axes[1].get_ylabel()
        np.testing.assert_allclose(axes[0].lines[0].get_xdata(), np.arange(400) / 200.0)
    elif modality == "audio":
        np.testing.assert_array_equal(drawn[0], x[0])
        assert axes[0].get_xlabel() == "time (s)" and "mel bin" in axes[0].get_ylabel()
    elif modality == "point":
        xyz = x[:, :3]
        np.testing.assert_array_equal(drawn[0], xyz[:, [0, 1]])
        np.testing.assert_array_equal(drawn[1], xyz[:, [0, 2]])
        np.testing.assert_array_equal(drawn[2], xyz[:, [2, 1]])
    elif modality == "fmri":
        np.testing.assert_array_equal(drawn[0], x)
    else:  # image, video, rgbd, rgbn: the frames, de-normalised for display and back
        frames = x.reshape(-1, 3, 224, 224)
        assert len(drawn) == len(frames)
        np.testing.assert_allclose(np.stack(drawn), frames, atol=2e-6)
        assert "de-normalised to RGB for display" in layout.title
    # the PNG has the layout's size
    out = tmp_path / f"{modality}.png"
    fig.savefig(out, dpi=DPI)
    with Image.open(out) as im:
        assert im.size == (round(layout.size[0] * DPI), round(layout.size[1] * DPI))


def test_imu_padding_is_shaded_where_the_window_is_zero_padded():
    item = _read("imu", start=3.0)  # walk.csv lasts 4 s: the last 1 s of the window is padding
    pad = item.meta["padded_samples"]
    assert 150 <= pad <= 250
    np.testing.assert_array_equal(item.array[:, 400 - pad:], 0.0)
    layout = preview_panels(item)
    t = layout.panels[0].data["x"]
    assert t[0] == pytest.approx(3.0)
    assert layout.panels[0].shade == pytest.approx((t[400 - pad], 5.0))


def test_shape_mismatch_is_an_input_error():
    from onellm.runtime.errors import InputError
    from onellm.runtime.modalities import ModalityInput

    with pytest.raises(InputError, match=r"shape \[6, 400\].*found shape \[6, 399\]"):
        preview_panels(ModalityInput("imu", np.zeros((6, 399), np.float32), {"source": "x.csv"}))


# ------------------------------------------------------------------ the command


def _run(args, **kw):
    return CliRunner().invoke(main, ["preview", *args], catch_exceptions=False, **kw)


def test_cli_writes_the_default_file_prints_facts_and_refuses_to_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = _run(EXAMPLE["imu"][1])
    assert res.exit_code == 0, res.output
    out = tmp_path / "preview-imu.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "source_rate_hz" in res.output and "wrote preview-imu.png" in res.output
    assert "tensor: [6, 400] float32" in res.output
    before = out.read_bytes()
    res = CliRunner().invoke(main, ["preview", *EXAMPLE["imu"][1], "--imu-start", "1"])
    assert res.exit_code == 2
    assert "preview-imu.png: expected a new file for the picture (pass --force to overwrite)" in res.output
    assert len(res.output.strip().splitlines()) == 1 and out.read_bytes() == before
    res = _run([*EXAMPLE["imu"][1], "--imu-start", "1", "--force"])
    assert res.exit_code == 0 and out.read_bytes() != before
    assert not list(tmp_path.glob(".*partial*"))


def test_cli_json_gives_the_reader_facts_and_the_tensor(tmp_path):
    out = tmp_path / "d.png"
    res = _run([*EXAMPLE["rgbd"][1], "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    item = _read("rgbd")
    assert got["modality"] == "rgbd" and got["picture"] == str(out) and out.is_file()
    want = {k: v for k, v in item.meta.items() if k != "preprocess_s"}
    assert {k: v for k, v in got["input"].items() if k != "preprocess_s"} == json.loads(json.dumps(want))
    t = got["tensor"]
    assert t["shape"] == [2, 3, 224, 224] and t["dtype"] == "float32"
    assert t["min"] == pytest.approx(float(item.array.min())) and t["std"] == pytest.approx(float(item.array.std()), rel=1e-6)


def test_cli_passes_the_reader_options_like_ask(tmp_path):
    res = _run([*EXAMPLE["imu"][1], "--imu-start", "1.5", "--accel-units", "m/s2",
                "--out", str(tmp_path / "p.png"), "--json"])
    facts = json.loads(res.output)["input"]
    assert facts["window_s"] == [1.5, 3.5] and facts["accel_units"].startswith("m/s2 (given")
    res = _run(["--audio", EXAMPLE["audio"][0], "--audio-start", "1", "--out", str(tmp_path / "a.png"), "--json"])
    assert json.loads(res.output)["input"]["padded_frames"] > json.loads(
        _run(["--audio", EXAMPLE["audio"][0], "--out", str(tmp_path / "b.png"), "--json"]).output)["input"]["padded_frames"]


@pytest.mark.parametrize("args, message", [
    ([], "options: expected exactly one input file to preview (e.g. --imu FILE), found none"),
    (["--imu", "IMU", "--audio", "AUDIO"], "found --audio and --imu"),
    (["--imu", "IMU", "--reader-option", "colour=red"], "--reader-option: expected an option of the imu reader"),
    (["--depth", "DEPTH"], "expected the RGB photo as well"),
])
def test_cli_errors_are_one_line(args, message, tmp_path):
    names = {"IMU": EXAMPLE["imu"][0], "AUDIO": EXAMPLE["audio"][0], "DEPTH": EXAMPLE["rgbd"][0]}
    res = CliRunner().invoke(main, ["preview", *[names.get(a, a) for a in args], "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2, res.output
    assert message in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def _cli_subprocess(blocked: str, out: Path) -> subprocess.CompletedProcess:
    """`onellm preview --imu walk.csv` in a fresh interpreter where `blocked` cannot be imported."""
    code = (
        "import sys, importlib.abc\n"
        "class _Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name == {blocked!r} or name.startswith({blocked + '.'!r}):\n"
        "            raise ImportError(name + ' is blocked in this test')\n"
        "sys.meta_path.insert(0, _Block())\n"
        "sys.argv[0] = 'onellm'\n"
        "from onellm.cli import main\n"
        "try:\n"
        "    main()\n"
        "finally:\n"
        f"    assert {blocked!r} not in sys.modules\n"
    )
    return subprocess.run([sys.executable, "-c", code, "preview", *EXAMPLE["imu"][1], "--out", str(out)],
                          capture_output=True, text=True, timeout=120)


def test_missing_matplotlib_is_a_one_line_error_naming_the_extra(tmp_path):
    res = _cli_subprocess("matplotlib", tmp_path / "x.png")
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == ("onellm: error: drawing a preview needs matplotlib: "
                                  "pip install 'onellm[preview]'")
    assert not (tmp_path / "x.png").exists()


def test_preview_needs_no_torch(tmp_path):
    res = _cli_subprocess("torch", tmp_path / "x.png")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"
