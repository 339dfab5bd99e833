"""Peak resident memory of `load_model` on a multi-GB checkpoint, relative to its size.

In: nothing (it synthesises the checkpoint). Out: one JSON object on stdout.

The release is ~15 GB of fp16. This writes a smaller stand-in with the same key
format: the 7b preset's encoder parts (CLIP ViT-L/14, the UPM experts, all eight
modalities' tokenizers and projections) and a 7b-width decoder cut to a few layers,
about 3.4 GB in fp16, into a temporary directory. Then, in a fresh subprocess, it imports torch and onellm,
records the baseline, loads the file with `load_model` and records the peak resident
set size (`getrusage(RUSAGE_SELF).ru_maxrss`) again; the ratio
(peak - baseline) / file size is the figure of merit. Afterwards it reads every weight
once (as a forward pass would) and reports RssAnon / RssFile from /proc/self/status.

What RSS counts: every page mapped into the process that is resident, file-backed
pages of a mmap included. Loading memory-maps the file and assigns the mapped tensors
as parameters, so loading touches almost none of the weights: the peak barely moves.
Reading the weights faults the file pages in; they then show up in RSS as RssFile
(page cache shared with the kernel, clean, droppable under memory pressure and re-read
from disk), while RssAnon (private memory that would need swap) stays small. A dtype
cast (fp16 file loaded as fp32) allocates anonymous memory for every cast tensor.

Run: `python -m onellm.benchmarks.load_rss [--layers 3] [--dtypes fp16,fp32] [--keep]`.
The checkpoint is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def bench_config(n_layers: int):
    """The 7b preset with its decoder cut to `n_layers` layers."""
    from onellm.ref.config import load_preset

    cfg = load_preset("7b")
    return dataclasses.replace(
        cfg, name=f"7b-{n_layers}layer", decoder=dataclasses.replace(cfg.decoder, n_layers=n_layers)
    )


def write_checkpoint(n_layers: int, path: Path, seed: int = 0) -> int:
    """A fp16 checkpoint of `bench_config(n_layers)` in the release's key format; returns bytes."""
    import torch

    from onellm.ref.checkpoint import PREFIX, build_meta_model

    gen = torch.Generator().manual_seed(seed)
    shapes = {k: tuple(v.shape) for k, v in build_meta_model(bench_config(n_layers)).state_dict().items()}
    sd = {PREFIX + k: torch.empty(s, dtype=torch.float16).normal_(0.0, 0.02, generator=gen) for k, s in shapes.items()}
    torch.save(sd, path)
    return path.stat().st_size


def _status() -> dict[str, int]:
    """VmRSS / RssAnon / RssFile of this process in bytes (Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _maxrss() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def measure(n_layers: int, path: Path, dtype: str) -> dict:
    """Runs in the fresh subprocess: baseline, load, touch; returns the numbers."""
    import torch

    from onellm.ref.checkpoint import load_model
    from onellm.ref.model import OneLLM  # noqa: F401  (imported before the baseline)

    base = _maxrss()
    base_status = _status()
    base_hwm = base_status.get("VmHWM", 0)
    t0 = time.perf_counter()
    model, report = load_model(bench_config(n_layers), path, dtype=dtype)
    load_s = time.perf_counter() - t0
    peak_load = _maxrss()
    after_load = _status()
    peak_load_hwm = after_load.get("VmHWM", 0)
    t0 = time.perf_counter()
    with torch.no_grad():
        checksum = sum(float(p.float().sum()) if p.numel() < 2**24 else float(p.sum(dtype=torch.float32))
                       for p in model.parameters())
    touch_s = time.perf_counter() - t0
    return {
        "dtype": dtype,
        "baseline_maxrss": base,
        "baseline_status": base_status,
        "load_s": round(load_s, 2),
        "load_peak_minus_baseline": peak_load - base,
        "after_load_status": after_load,
        "cast_bytes": report.cast_bytes,
        "touch_s": round(touch_s, 2),
        "touch_peak_minus_baseline": _maxrss() - base,
        "after_touch_status": (after_touch := _status()),
        "hwm_load_peak_minus_baseline": peak_load_hwm - base_hwm,
        "hwm_touch_peak_minus_baseline": after_touch.get("VmHWM", 0) - base_hwm,
        "checksum": checksum,
        "n_params": report.n_params,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=3, help="decoder layers (3 -> ~3.4 GB fp16)")
    ap.add_argument("--dtypes", default="fp16", help="comma list of load dtypes, e.g. fp16,fp32")
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    ap.add_argument("--_measure", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    ap.add_argument("--_write", metavar="PATH", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._write:  # in its own process: the parent's peak RSS stays small (see below)
        sys.stdout.write(f"{write_checkpoint(args.layers, Path(args._write))}\n")
        return {}

    if args._measure:
        result = measure(args.layers, Path(args._measure[0]), args._measure[1])
        sys.stdout.write(json.dumps(result) + "\n")
        return result

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    workdir = Path(tempfile.mkdtemp(prefix="onellm-rss-", dir=args.dir))
    path = workdir / "consolidated.00-of-01.pth"
    try:
        t0 = time.perf_counter()
        # On Linux ru_maxrss survives fork+exec, so the measuring child would inherit the
        # peak of a parent that had built the state dict: write it in a sibling process.
        subprocess.run(
            [sys.executable, "-m", "onellm.benchmarks.load_rss", "--layers", str(args.layers), "--_write", str(path)],
            check=True, stdout=subprocess.DEVNULL,
        )
        size = path.stat().st_size
        log.info("wrote %s: %.2f GB in %.1fs", path, size / 1e9, time.perf_counter() - t0)
        runs = []
        for dtype in args.dtypes.split(","):
            proc = subprocess.run(
                [sys.executable, "-m", "onellm.benchmarks.load_rss", "--layers", str(args.layers),
                 "--_measure", str(path), dtype],
                capture_output=True, text=True, check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"measurement subprocess failed: {proc.stderr.strip()[-500:]}")
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            for name in ("load", "touch", "hwm_load", "hwm_touch"):
                run[f"{name}_ratio"] = round(run[f"{name}_peak_minus_baseline"] / size, 4)
            runs.append(run)
            log.info(
                "%s: load peak RSS +%.0f MiB = %.3fx file (VmHWM %.3fx, %.1fs); after reading all weights "
                "+%.0f MiB = %.3fx (RssAnon %.0f MiB, RssFile %.0f MiB)",
                dtype, run["load_peak_minus_baseline"] / 2**20, run["load_ratio"], run["hwm_load_ratio"], run["load_s"],
                run["touch_peak_minus_baseline"] / 2**20, run["touch_ratio"],
                run["after_touch_status"].get("RssAnon", 0) / 2**20, run["after_touch_status"].get("RssFile", 0) / 2**20,
            )
        result = {"file_bytes": size, "config": bench_config(args.layers).name, "runs": runs}
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return result
    finally:
        if args.keep:
            log.info("kept %s", path)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
