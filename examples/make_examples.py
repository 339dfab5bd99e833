"""Write the small example inputs under examples/ (one per modality), deterministically.

    python examples/make_examples.py          # rewrites every file below

All of them are synthetic but physically plausible; nothing is downloaded.

- image/photo.jpg, depth/depth.png, normal/normal.png: one ray-cast scene (a red
  ball on a chequered floor under a sky, 320x240), with its depth (8-bit, near
  bright, as the runtime's depth conversion) and camera-space normals ((n + 1) / 2).
- video/clip.mp4: 2 s, 25 fps, 320x240 H.264: a ball rolling across the floor.
- audio/speech.wav: 2.6 s, 16 kHz mono 16-bit. espeak-ng is not assumed: this is a
  synthetic voiced signal (a glottal pulse train with a falling-rising pitch through
  vowel formant filters, syllables separated by short noise bursts), speech-like in
  its spectrum and rhythm but without words.
- point/mug.ply: 8192 points of a red mug with a white stripe and a handle, binary
  little-endian PLY, float x/y/z and uchar red/green/blue.
- imu/walk.csv: 4 s at 100 Hz of a walking person's head-mounted IMU: gravity on the
  y axis (camera convention, y down: about -9.81 m/s^2), a 1.8 Hz step bounce, sway
  and head turns; columns time_s, acc_x..acc_z (m/s^2), gyro_x..gyro_z (rad/s).
- fmri/betas.npy: float16 [15724], spatially smooth random betas with the spread of
  NSD's z-scored responses (subject 1 "nsdgeneral" length); not a real recording.
"""

from __future__ import annotations

import csv
import sys
import wave
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
W, H = 320, 240
FOCAL = 300.0
SPHERE_R = 0.8
LIGHT = np.array([-0.5, 1.0, 0.6]) / np.linalg.norm([-0.5, 1.0, 0.6])
FAR = 12.0  # depth beyond this is left out of the depth map (a sensor's range)


def render(ball_x: float = 0.0, ball_z: float = -4.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rgb uint8 [H,W,3], depth metres [H,W] (0 = sky), normals [H,W,3]) of the scene."""
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
    d = np.stack([(xs + 0.5 - W / 2) / FOCAL, -(ys + 0.5 - H / 2) / FOCAL, -np.ones_like(xs)], axis=-1)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    centre = np.array([ball_x, -1.0 + SPHERE_R, ball_z])
    # sphere: |t d - c|^2 = r^2
    b = d @ centre
    disc = b ** 2 - (centre @ centre - SPHERE_R ** 2)
    t_s = np.where(disc > 0, b - np.sqrt(np.maximum(disc, 0)), np.inf)
    t_s[t_s <= 0] = np.inf
    # floor y = -1
    t_f = np.where(d[..., 1] < -1e-6, -1.0 / np.minimum(d[..., 1], -1e-6), np.inf)
    t = np.minimum(t_s, t_f)
    hit_s, hit_f = (t_s <= t_f) & np.isfinite(t_s), (t_f < t_s) & np.isfinite(t_f)
    p = d * np.where(np.isfinite(t), t, 0.0)[..., None]
    n = np.zeros_like(d)
    n[hit_s] = (p[hit_s] - centre) / SPHERE_R
    n[hit_f] = [0.0, 1.0, 0.0]
    sky = ~(hit_s | hit_f)
    n[sky] = [0.0, 0.0, 1.0]
    lam = np.clip(n @ LIGHT, 0, 1)
    # shadow of the ball on the floor
    to_c = centre - p
    proj = to_c @ LIGHT
    closest = np.linalg.norm(to_c - proj[..., None] * LIGHT, axis=-1)
    shadow = hit_f & (proj > 0) & (closest < SPHERE_R)
    lam = np.where(shadow, 0.15 * lam, lam)
    check = ((np.floor(p[..., 0] * 1.5) + np.floor(p[..., 2] * 1.5)) % 2 == 0)
    base = np.zeros_like(d)
    base[hit_f] = np.where(check[hit_f, None], [0.85, 0.82, 0.75], [0.35, 0.33, 0.3])
    base[hit_s] = [0.85, 0.12, 0.1]
    rgb = base * (0.25 + 0.75 * lam[..., None])
    if hit_s.any():  # a highlight on the ball
        refl = 2 * (n @ LIGHT)[..., None] * n - LIGHT
        spec = np.clip(-(refl * d).sum(-1), 0, 1) ** 40
        rgb[hit_s] += 0.6 * spec[hit_s, None]
    sky_col = np.stack([0.55 + 0.25 * (1 - ys / H), 0.7 + 0.2 * (1 - ys / H), np.full_like(ys, 0.95)], -1)
    rgb[sky] = sky_col[sky]
    depth = np.where(sky, 0.0, -p[..., 2])
    depth[depth > FAR] = 0.0
    return np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8), depth, n


def target(modality: str) -> Path:
    """Where a modality's example goes: the path its spec declares (`ModalitySpec.example`)."""
    from onellm.runtime.modalities import get_modality

    path = HERE / get_modality(modality).example.path
    path.parent.mkdir(exist_ok=True)
    return path


def write_scene() -> None:
    from PIL import Image

    from onellm.runtime.modalities._rgbx import depth_to_uint8

    rgb, depth, n = render()
    Image.fromarray(rgb).save(target("image"), quality=90, optimize=True)
    Image.fromarray(depth_to_uint8(depth)[0]).save(target("rgbd"), optimize=True)
    Image.fromarray(np.rint((n + 1) * 127.5).astype(np.uint8)).save(target("rgbn"), optimize=True)


def write_video() -> None:
    import av

    fps, n_frames = 25, 50
    with av.open(str(target("video")), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": "30", "preset": "medium"}
        for i in range(n_frames):
            x = -1.6 + 3.2 * i / (n_frames - 1)
            rgb, _, _ = render(ball_x=x, ball_z=-4.0 - 0.5 * np.sin(np.pi * i / n_frames))
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def write_audio() -> None:
    from scipy.signal import lfilter

    sr = 16000
    rng = np.random.default_rng(7)
    vowels = [(730, 1090, 2440), (270, 2290, 3010), (530, 1840, 2480), (300, 870, 2240),
              (570, 840, 2410), (730, 1090, 2440), (270, 2290, 3010), (530, 1840, 2480)]
    syl, gap = 0.26, 0.06
    total = int(sr * (len(vowels) * (syl + gap) + 0.1))
    t = np.arange(total) / sr
    f0 = 135 - 25 * np.sin(np.pi * t / t[-1]) + 8 * np.sin(2 * np.pi * 3 * t)  # falling-rising pitch
    phase = np.cumsum(f0 / sr)
    pulses = np.diff(np.floor(phase), prepend=0.0)  # one impulse per glottal period
    glottal = lfilter([1.0], [1.0, -0.97], pulses)  # spectral tilt of the voice source
    out = np.zeros(total)
    for k, formants in enumerate(vowels):
        a = int(sr * (0.05 + k * (syl + gap)))
        b = a + int(sr * syl)
        seg = glottal[a:b].copy()
        for f, bw in zip(formants, (80, 100, 120)):
            r = np.exp(-np.pi * bw / sr)
            seg = lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * f / sr), r * r], seg)
        env = np.sin(np.pi * np.linspace(0, 1, len(seg))) ** 0.6
        out[a:b] += seg * env
        c = b + int(sr * gap * 0.3)  # a consonant-like burst in the gap
        burst = rng.standard_normal(int(sr * gap * 0.5)) * np.hanning(int(sr * gap * 0.5))
        burst = lfilter([1, -0.9], [1.0], burst)
        out[c:c + len(burst)] += 0.05 * burst
    out = out / np.abs(out).max() * 0.6
    pcm = np.rint(out * 32767).astype("<i2")
    with wave.open(str(target("audio")), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())


def mug_points(n: int = 8192, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(xyz [n,3] metres, rgb uint8 [n,3]) on the surface of a mug, area-weighted."""
    rng = np.random.default_rng(seed)
    r, h, wall = 0.04, 0.1, 0.004
    parts = {  # name: area
        "outer": 2 * np.pi * r * h, "inner": 2 * np.pi * (r - wall) * (h - wall),
        "bottom": np.pi * r ** 2, "handle": 4 * np.pi ** 2 * 0.025 * 0.006 * 0.6,
    }
    names = list(parts)
    counts = rng.multinomial(n, np.array(list(parts.values())) / sum(parts.values()))
    xyz, rgb = [], []
    red, white = np.array([200, 30, 35]), np.array([235, 235, 228])
    for name, k in zip(names, counts):
        u, v = rng.random(k), rng.random(k)
        if name in ("outer", "inner"):
            rr = r if name == "outer" else r - wall
            a = 2 * np.pi * u
            y = v * h if name == "outer" else wall + v * (h - wall)
            p = np.stack([rr * np.cos(a), y, rr * np.sin(a)], 1)
            stripe = (np.abs(y - 0.06) < 0.008)[:, None]
            c = np.where(stripe, white, red) if name == "outer" else np.tile(white, (k, 1))
        elif name == "bottom":
            rad, a = r * np.sqrt(u), 2 * np.pi * v
            p = np.stack([rad * np.cos(a), np.zeros(k), rad * np.sin(a)], 1)
            c = np.tile(red, (k, 1))
        else:  # a half torus on the +x side
            a = np.pi * (u - 0.5)
            b = 2 * np.pi * v
            R, rt = 0.025, 0.006
            p = np.stack([r + (R + rt * np.cos(b)) * np.cos(a) - 0.005,
                          0.05 + (R + rt * np.cos(b)) * np.sin(a), rt * np.sin(b)], 1)
            c = np.tile(red, (k, 1))
        xyz.append(p)
        rgb.append(c)
    xyz, rgb = np.concatenate(xyz), np.concatenate(rgb)
    shade = (0.85 + 0.15 * rng.random((len(xyz), 1)))  # a little texture
    return xyz.astype(np.float32), np.clip(rgb * shade, 0, 255).astype(np.uint8)


def write_ply(path: Path, xyz: np.ndarray, rgb: np.ndarray | None, binary: bool = True) -> Path:
    """A PLY with float x/y/z and, when given, uchar red/green/blue."""
    props = "property float x\nproperty float y\nproperty float z\n"
    if rgb is not None:
        props += "property uchar red\nproperty uchar green\nproperty uchar blue\n"
    fmt = "binary_little_endian" if binary else "ascii"
    header = f"ply\nformat {fmt} 1.0\ncomment onellm example\nelement vertex {len(xyz)}\n{props}end_header\n"
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        if binary:
            fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
            if rgb is not None:
                fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
            rec = np.empty(len(xyz), dtype=fields)
            rec["x"], rec["y"], rec["z"] = xyz.T
            if rgb is not None:
                rec["red"], rec["green"], rec["blue"] = rgb.T
            f.write(rec.tobytes())
        else:
            for i in range(len(xyz)):
                row = " ".join(f"{v:.6f}" for v in xyz[i])
                if rgb is not None:
                    row += " " + " ".join(str(int(v)) for v in rgb[i])
                f.write((row + "\n").encode("ascii"))
    return path


def write_point() -> None:
    xyz, rgb = mug_points()
    write_ply(target("point"), xyz, rgb, binary=True)


def walk_imu(seconds: float = 4.0, rate: int = 100, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(t [N] s, [N,6] acc m/s^2 + gyro rad/s) of walking, gravity on -y."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    step = 1.8
    w = 2 * np.pi * step
    acc = np.stack([
        0.7 * np.sin(w / 2 * t + 0.3),
        -9.81 + 2.0 * np.sin(w * t) + 0.6 * np.sin(2 * w * t + 0.8),
        0.9 * np.sin(w * t + 1.2) + 0.3,
    ], 1)
    gyro = np.stack([
        0.2 * np.sin(w * t + 0.5),
        0.3 * np.sin(w / 2 * t) + 0.25 * np.sin(2 * np.pi * 0.25 * t),
        0.15 * np.sin(w / 2 * t + 1.0),
    ], 1)
    data = np.concatenate([acc, gyro], 1) + rng.normal(0, [0.05] * 3 + [0.01] * 3, (len(t), 6))
    return t, data


def write_imu() -> None:
    t, data = walk_imu()
    with open(target("imu"), "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["time_s", "acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"])
        for ti, row in zip(t, data):
            wr.writerow([f"{ti:.3f}"] + [f"{v:.5f}" for v in row])


def write_fmri(seed: int = 11) -> None:
    rng = np.random.default_rng(seed)
    x = np.convolve(rng.standard_normal(15724 + 8), np.ones(9) / 3.0, mode="valid")[:15724]
    np.save(target("fmri"), x.astype(np.float16))


def main() -> None:
    write_scene()
    write_video()
    write_audio()
    write_point()
    write_imu()
    write_fmri()
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file() and p.suffix != ".py")
    sys.stdout.write(f"examples written under {HERE} ({total / 1024:.0f} KiB)\n")


if __name__ == "__main__":
    main()
