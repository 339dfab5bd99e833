"""See what the model sees: a picture of exactly the tensor a reader hands to the encoder.

In:  a `ModalityInput` (what `pipeline.read_input` returns: the encoder's input array,
     no batch dimension, and the reader's facts).
Out: `preview_panels(item)`: the panels to draw, each holding the very arrays it shows
     (numpy only; tests compare them with `item.array`); `draw_preview(item)`: a
     matplotlib `Figure` of them; `write_preview(item, path)`: that figure as a PNG.

What is drawn is chosen by the modality's tokenizer kind and frame count, not its name,
so a new modality with an existing kind is drawn without touching this file:

- conv1d (imu): one panel per sensor (channel-name prefix: acc, gyro) of the 2 s window
  at the reader's target rate, in the units the encoder gets; zero padding is shaded;
- conv2d (audio): the normalised log-mel fbank, mel bins over 10 ms frames;
- clip_patch: each 224x224 frame, de-normalised back to RGB (x * CLIP_STD + CLIP_MEAN,
  clipped to 0..1) for display; one frame (image), photo + map (depth, normal), or a
  grid with a row per clip and a column per crop (video);
- point_patch: three orthographic views of the normalised xyz, coloured by the RGB
  channels, farther points drawn first;
- linear (fmri): the voxel vector against its index, and its histogram;
- any other kind: the array as a heat map.

matplotlib is an optional extra (`pip install 'onellm[preview]'`); it is imported only
when drawing, and the Agg canvas is used directly (no pyplot, no display needed).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, InputError
from .modalities import ModalityInput, get_modality
from .modalities.base import reader_constants

DPI = 100
MISSING_EXTRA = "drawing a preview needs matplotlib: pip install 'onellm[preview]'"
# Units of the IMU channel groups as the encoder gets them (runtime/modalities/imu.py).
_SENSOR_UNITS = {"acc": ("accelerometer", "m/s²"), "gyro": ("gyroscope", "rad/s")}
_AXIS_COLOURS = ("tab:red", "tab:green", "tab:blue")


@dataclasses.dataclass(frozen=True)
class Panel:
    """One axes of the preview: the arrays it draws, exactly, and how it is labelled.

    kind and data:
      lines    x [N], y [k, N] (one line per row; labels name them); shade: x span drawn grey
      heatmap  z [rows, cols] drawn with `extent` (x0, x1, y0, y1), origin at the bottom
      image    rgb [H, W, 3] in 0..1, one pixel per pixel
      points   xy [N, 2] and rgb [N, 3] (drawn in this order), order [N]: rows of the input
      vector   x [N], y [N]
      hist     values [N] (a histogram of them)
    """

    kind: str
    title: str
    data: dict[str, np.ndarray]
    xlabel: str = ""
    ylabel: str = ""
    labels: tuple[str, ...] = ()
    extent: tuple[float, float, float, float] | None = None
    colorbar: str = ""
    shade: tuple[float, float] | None = None
    shade_label: str = ""


@dataclasses.dataclass(frozen=True)
class Layout:
    """The panels of one preview, their grid and the figure's size in inches."""

    title: str
    panels: list[Panel]
    rows: int
    cols: int
    size: tuple[float, float]


def preview_panels(item: ModalityInput) -> Layout:
    """What `draw_preview` draws for this input: panels whose data are the input's array."""
    spec = get_modality(item.modality)
    x = np.asarray(item.array)
    if tuple(x.shape) != tuple(spec.input_shape):
        raise InputError(item.meta.get("source", item.modality), f"a {item.modality} array of shape "
                         f"{list(spec.input_shape)}", f"shape {list(x.shape)}")
    source = Path(str(item.meta.get("source", "array"))).name
    title = f"{item.modality} from {source}: the {list(x.shape)} {x.dtype} tensor the encoder gets"
    kind = spec.tokenizer_kind
    if kind == "conv1d":
        return _imu_layout(item, x, title)
    if kind == "conv2d":
        return _fbank_layout(item, x, title)
    if kind == "clip_patch":
        return _frames_layout(item, x, title, spec)
    if kind == "point_patch":
        return _points_layout(x, title)
    if kind == "linear":
        return _vector_layout(x, title)
    z = x.reshape(x.shape[0], -1) if x.ndim > 1 else x[None]
    return Layout(title, [Panel("heatmap", "values", {"z": z}, "index", "row",
                                extent=(0, z.shape[1], 0, z.shape[0]))], 1, 1, (10.0, 4.0))


# ------------------------------------------------------------------ per kind


def _constants(modality: str) -> dict[str, Any]:
    try:
        return reader_constants(modality)
    except ImportError:  # pragma: no cover - a registered modality always imports
        return {}


def _imu_layout(item: ModalityInput, x: np.ndarray, title: str) -> Layout:
    module = importlib.import_module(get_modality(item.modality).preprocess.__module__)
    names = tuple(getattr(module, "CHANNELS", [f"channel {i}" for i in range(x.shape[0])]))
    rate = float(_constants(item.modality).get("TARGET_RATE", 1.0))
    start = float((item.meta.get("window_s") or [0.0])[0])
    t = start + np.arange(x.shape[1], dtype=np.float64) / rate
    padded = int(item.meta.get("padded_samples", 0) or 0)
    shade = (float(t[x.shape[1] - padded]), float(t[-1] + 1.0 / rate)) if padded else None
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name.split("_")[0], []).append(i)
    panels = []
    for prefix, rows in groups.items():
        sensor, unit = _SENSOR_UNITS.get(prefix, (prefix, "as read"))
        panels.append(Panel(
            "lines", f"{sensor} ({unit}), {len(t)} samples at {rate:g} Hz", {"x": t, "y": x[rows]},
            xlabel="time in the recording (s)", ylabel=f"{sensor} ({unit})",
            labels=tuple(names[i] for i in rows), shade=shade,
            shade_label=f"zero padding ({padded} samples past the end of the recording)"))
    window = item.meta.get("window_s")
    if window:
        title += f"; window {window[0]:g}-{window[1]:g} s"
    return Layout(title, panels, len(panels), 1, (12.0, 3.2 * len(panels) + 0.8))


def _fbank_layout(item: ModalityInput, x: np.ndarray, title: str) -> Layout:
    c = _constants(item.modality)
    z = x.reshape(-1, x.shape[-1])
    shift = c.get("FRAME_SHIFT")
    rate = c.get("SAMPLE_RATE")
    step = float(shift) / float(rate) if shift and rate else 1.0
    xlabel = "time (s)" if shift and rate else "frame"
    extent = (0.0, z.shape[1] * step, 0.0, float(z.shape[0]))
    norm = ""
    if "NORM_MEAN" in c and "NORM_STD" in c:
        norm = f"(log-mel - ({c['NORM_MEAN']:.4g})) / (2 × {c['NORM_STD']:.4g})"
    padded = int(item.meta.get("padded_frames", 0) or 0)
    shade = (extent[1] - padded * step, extent[1]) if padded else None
    frames = f"{z.shape[1]} frames of {step * 1000:g} ms" if shift and rate else f"{z.shape[1]} frames"
    return Layout(title, [Panel(
        "heatmap", f"log-mel filterbank, {z.shape[0]} mel bins x {frames}", {"z": z},
        xlabel=xlabel, ylabel="mel bin (low to high frequency)", extent=extent,
        colorbar=norm or "value", shade=shade,
        shade_label=f"padding: {padded} frames past the end of the audio (zeros before normalisation)")],
        1, 1, (12.0, 4.6))


def _to_rgb(frame: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """A CLIP-normalised [3,H,W] frame -> [H,W,3] in 0..1 for display."""
    rgb = frame.astype(np.float32) * std[:, None, None] + mean[:, None, None]
    return np.clip(rgb, 0.0, 1.0).transpose(1, 2, 0)


def _frames_layout(item: ModalityInput, x: np.ndarray, title: str, spec) -> Layout:
    from .modalities._imaging import CLIP_MEAN, CLIP_STD

    frames = x.reshape(-1, *x.shape[-3:])
    n = len(frames)
    h, w = frames.shape[-2:]
    title += "; de-normalised to RGB for display"
    if n == 1:
        panels = [Panel("image", f"the {h}x{w} crop", {"rgb": _to_rgb(frames[0], CLIP_MEAN, CLIP_STD)})]
        return Layout(title, panels, 1, 1, (6.0, 6.6))
    if spec.requires_image and n == 2:
        names = (f"photo (--image), {h}x{w} crop", f"{spec.cli_option.lstrip('-')} map ({spec.cli_option}), "
                 f"{h}x{w} crop")
        panels = [Panel("image", names[i], {"rgb": _to_rgb(frames[i], CLIP_MEAN, CLIP_STD)}) for i in range(2)]
        return Layout(title, panels, 1, 2, (11.0, 6.0))
    cols = 3 if n % 3 == 0 else n
    rows = n // cols
    if cols > 1:
        title += f"\nrows: {rows} clips (first frame of each), columns: {cols} crops along the long side"
    times = item.meta.get("frame_times_s") or []
    panels = []
    for i, frame in enumerate(frames):
        r, k = divmod(i, cols)
        when = f" at {times[r]:.2f} s" if r < len(times) else ""
        name = f"clip {r + 1}{when}, crop {k + 1}/{cols}" if cols > 1 else f"frame {i + 1}{when}"
        panels.append(Panel("image", name, {"rgb": _to_rgb(frame, CLIP_MEAN, CLIP_STD)}))
    return Layout(title, panels, rows, cols, (2.9 * cols + 0.4, 3.1 * rows + 1.0))


# (horizontal axis, vertical axis, depth axis) of each orthographic view
_VIEWS = ((0, 1, 2), (0, 2, 1), (2, 1, 0))
_XYZ = "xyz"


def _points_layout(x: np.ndarray, title: str) -> Layout:
    xyz, rgb = x[:, :3], np.clip(x[:, 3:6], 0.0, 1.0)
    panels = []
    for a, b, d in _VIEWS:
        order = np.argsort(xyz[:, d], kind="stable")  # farther (smaller depth) first, nearer on top
        panels.append(Panel(
            "points", f"{_XYZ[a]}-{_XYZ[b]} plane, seen from +{_XYZ[d]}",
            {"xy": xyz[order][:, [a, b]], "rgb": rgb[order], "order": order},
            xlabel=f"{_XYZ[a]} (normalised: centred, max radius 1)", ylabel=f"{_XYZ[b]}"))
    title += f"; {len(x)} points, coloured by their RGB channels"
    return Layout(title, panels, 1, 3, (15.0, 5.6))


def _vector_layout(x: np.ndarray, title: str) -> Layout:
    v = x.reshape(-1)
    idx = np.arange(v.size)
    stats = f"mean {v.mean():.3g}, std {v.std():.3g}, min {v.min():.3g}, max {v.max():.3g}"
    return Layout(title, [
        Panel("vector", f"the {v.size} values in input order ({stats})", {"x": idx, "y": v},
              xlabel="voxel index", ylabel="value (beta, as given)"),
        Panel("hist", "distribution of the values", {"values": v}, xlabel="value (beta, as given)",
              ylabel="voxels"),
    ], 2, 1, (12.0, 6.8))


# ------------------------------------------------------------------ drawing


def require_matplotlib():
    """matplotlib's Figure class, or a one-line ConfigError naming the extra to install."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(MISSING_EXTRA) from None
    return Figure


def draw_preview(item: ModalityInput) -> tuple[Any, Layout]:
    """(matplotlib Figure, the layout it draws) for one input; nothing is written."""
    Figure = require_matplotlib()
    layout = preview_panels(item)
    fig = Figure(figsize=layout.size, dpi=DPI, layout="constrained")
    width = max(40, int(layout.size[0] * 12))  # characters of an 11 pt title line that fit the figure
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in layout.title.split("\n")), fontsize=11)
    axes = fig.subplots(layout.rows, layout.cols, squeeze=False).ravel()
    for ax, panel in zip(axes, layout.panels):
        _draw_panel(fig, ax, panel)
    for ax in axes[len(layout.panels):]:
        ax.set_visible(False)
    return fig, layout


def _draw_panel(fig, ax, p: Panel) -> None:
    d = p.data
    if p.kind == "lines":
        for i, y in enumerate(d["y"]):
            ax.plot(d["x"], y, lw=0.9, color=_AXIS_COLOURS[i % 3],
                    label=p.labels[i] if i < len(p.labels) else None)
        if p.shade:
            ax.axvspan(*p.shade, color="0.85", zorder=0, label=p.shade_label)
        ax.set_xlim(float(d["x"][0]), float(d["x"][-1]))
        ax.grid(True, lw=0.3, alpha=0.6)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    elif p.kind == "heatmap":
        im = ax.imshow(d["z"], origin="lower", aspect="auto", extent=p.extent, interpolation="nearest",
                       cmap="magma")
        fig.colorbar(im, ax=ax, label=p.colorbar, pad=0.01)
        if p.shade:
            ax.axvspan(*p.shade, facecolor="none", edgecolor="white", hatch="//", lw=0.0, alpha=0.5,
                       label=p.shade_label)
            ax.legend(loc="upper right", fontsize=8)
    elif p.kind == "image":
        ax.imshow(d["rgb"], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    elif p.kind == "points":
        ax.scatter(d["xy"][:, 0], d["xy"][:, 1], c=d["rgb"], s=2.0, linewidths=0)
        ax.set_aspect("equal")
        ax.set_xlim(-1.05, 1.05)
        ax.set_ylim(-1.05, 1.05)
        ax.grid(True, lw=0.3, alpha=0.6)
    elif p.kind == "vector":
        ax.plot(d["x"], d["y"], lw=0.3, color="tab:blue")
        ax.set_xlim(0, len(d["x"]) - 1)
        ax.grid(True, lw=0.3, alpha=0.6)
    elif p.kind == "hist":
        ax.hist(d["values"], bins=min(200, max(10, int(math.sqrt(d["values"].size)))), color="tab:blue")
    ax.set_title(p.title, fontsize=9)
    if p.xlabel:
        ax.set_xlabel(p.xlabel)
    if p.ylabel:
        ax.set_ylabel(p.ylabel)


def write_preview(item: ModalityInput, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Draw `item` into a PNG at `path` (never over an existing file unless force)."""
    target = Path(path)
    if target.exists() and not force:
        raise InputError(target, "a new file for the picture (pass --force to overwrite)", "an existing file")
    fig, _ = draw_preview(item)
    tmp = target.with_name(f".{target.name}.partial.png")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, target)
    except OSError as exc:
        raise InputError(target, "a writable path for the picture", exc.strerror or str(exc)) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def input_summary(item: ModalityInput) -> dict[str, Any]:
    """JSON-ready facts about the tensor: shape, dtype and value statistics."""
    x = np.asarray(item.array, dtype=np.float64)
    return {"shape": list(item.array.shape), "dtype": str(item.array.dtype),
            "min": float(x.min()), "max": float(x.max()), "mean": float(x.mean()), "std": float(x.std())}
