"""The `onellm bench` reports: the targets, and the JSON / Markdown / PNG files.

`evaluate_targets(...)` turns the measured rows into the issue's target ratios.
`write_reports(result, out_dir)` writes `bench.json` (`BenchResult.to_dict()`, schema
`onellm-bench` v1), `bench.md` and `bench.png` (the chart is skipped, with a notice,
when matplotlib is missing: `pip install 'onellm[bench]'`). The rows are typed
(`benchmarks/result.py`); an older bench.json is read back with `load_result`, which
names any unknown, missing or mistyped key:

    python -m onellm.benchmarks.report bench.json --out DIR   # re-render bench.md / bench.png
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .result import (
    BenchResult, ChatRow, DecodeLoopRow, DecoderRow, EncoderChainRow, EncoderRow, FootprintRow, Stat, Target,
    load_result,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- targets


def _target(name, description, measured, threshold, comparison) -> Target:
    met = None
    if measured is not None:
        met = measured >= threshold if comparison == ">=" else measured <= threshold
    return Target(name=name, description=description, measured=measured, threshold=threshold,
                  comparison=comparison, met=met)


def _rows(rows, **match):
    return [r for r in rows if all(getattr(r, k) == v for k, v in match.items())]


RUNTIME_BACKENDS = ("onnxruntime", "openvino")  # what the runtime's encoder runs on (ov-int8: OpenVINO)


def _runtime_cpu_encoders(encoder, m: str) -> list:
    """The runtime's CPU encoder rows of one modality at a cosine of 0.99 or more."""
    return [r for r in encoder if r.modality == m and r.device == "cpu" and r.backend in RUNTIME_BACKENDS
            and (r.cosine_vs_torch_fp32 if r.cosine_vs_torch_fp32 is not None else 1.0) >= 0.99]


# issue 13's targets (7B and bench preset): runtime vs torch's fastest precision on this CPU (bf16
# where the CPU has bf16 arithmetic, which the issue names; else fp32: the bench runs no emulated
# bf16), our own share of the time to first token, our decode loop vs plain llama-cpp-python, and
# peak RSS over the files it loads
ENCODER_VS_TORCH = 2.5
TTFT_VS_TORCH = 2.0
DECODE_VS_TORCH = 2.5
DECODE_LOOP_VS_PLAIN = 0.97
OUR_SHARE_OF_TTFT = 0.02
RSS_OVER_FILES_MIB = 600.0


def evaluate_targets(modalities: Sequence[str], encoder: Sequence[EncoderRow], decoder: Sequence[DecoderRow],
                     decode_loop: Sequence[DecodeLoopRow], chat: ChatRow | None,
                     encoder_chain: Sequence[EncoderChainRow] = (),
                     footprint: Sequence[FootprintRow] = ()) -> list[Target]:
    """The issue's targets as measured ratios (absent where a row needed for it was not run)."""
    out = _targets_v1(modalities, encoder, decoder, decode_loop, chat)
    for m in modalities:
        out += _vs_torch_targets(m, encoder, decoder, encoder_chain)
    for loop in decode_loop:
        paired = loop.ratio_shipped_paired if loop.ours_shipped is not None else loop.ratio_paired
        if paired is not None:  # the median of round-by-round ratios (runs before: of the medians)
            shipped, how = paired.median, "median of per-round ratios"
        else:
            shipped, how = loop.ratio_shipped if loop.ratio_shipped is not None else loop.ratio, "ratio of medians"
        out.append(_target(f"decode_loop_shipped_vs_plain/{loop.quant}",
                           f"decode tokens/s, our Session as shipped / llama-cpp-python ({loop.quant}, same GGUF; "
                           f"{how})", shipped, DECODE_LOOP_VS_PLAIN, ">="))
    for f in footprint:
        if f.peak_rss_mib is not None and f.gguf_mib is not None and f.encoder_mib is not None:
            out.append(_target(
                f"peak_rss_over_files/{f.precision}+{f.quant}",
                f"peak RSS - (GGUF {f.gguf_mib:.0f} MiB + {f.precision} encoder graphs {f.encoder_mib:.0f} MiB), "
                f"MiB ({f.quant}, fresh process answering once)",
                f.peak_rss_mib - f.gguf_mib - f.encoder_mib, RSS_OVER_FILES_MIB, "<="))
    return out


def _paired(stat: Stat | None) -> str:
    """`; per round m (lo-hi)` for a round-by-round ratio, empty for runs without it."""
    if stat is None:
        return ""
    return f"; per round {stat.median:.3f} ({stat.min:.3f}-{stat.max:.3f})"


def _vs_torch_targets(m: str, encoder: Sequence[EncoderRow], decoder: Sequence[DecoderRow],
                      encoder_chain: Sequence[EncoderChainRow]) -> list[Target]:
    """Runtime best vs torch's fastest precision on one modality: encoder, time to first token,
    decode; and how much of the runtime's best time to first token is our own code (reader +
    chain overhead)."""
    out = []
    ort_rows = _runtime_cpu_encoders(encoder, m)
    ob = min(ort_rows, key=lambda r: r.encode_s.median) if ort_rows else None
    te = _rows(encoder, modality=m, backend="torch", device="cpu")
    if te and ob:
        tb = min(te, key=lambda r: r.encode_s.median)
        out.append(_target(f"encoder_vs_torch_best_x2.5/{m}",
                           f"{m}: torch {tb.precision} encoder time / runtime best CPU encoder ({ob.precision}, "
                           f"cosine {ob.cosine_vs_torch_fp32:.4f}) time", tb.encode_s.median / ob.encode_s.median,
                           ENCODER_VS_TORCH, ">="))
    runtime = [r for r in _rows(decoder, modality=m, backend="llama.cpp") if r.ttft_s]
    best = min(runtime, key=lambda r: r.ttft_s) if runtime else None
    td = [r for r in _rows(decoder, modality=m, backend="torch") if r.ttft_s]
    if best and td:
        tt = min(td, key=lambda r: r.ttft_s)
        out.append(_target(f"ttft_vs_torch_best/{m}",
                           f"{m}: torch {tt.precision} time to first token / runtime best ({best.precision}, "
                           f"{best.encoder_used} encoder)", tt.ttft_s / best.ttft_s, TTFT_VS_TORCH, ">="))
        tk = max(td, key=lambda r: r.decode_tokens_per_s)
        out.append(_target(f"decode_vs_torch_best/{m}",
                           f"{m}: decode tokens/s of that runtime row ({best.precision}) / torch {tk.precision}'s",
                           best.decode_tokens_per_s / tk.decode_tokens_per_s, DECODE_VS_TORCH, ">="))
    if best and ob:
        pre = ob.stages_s["preprocess"].median if "preprocess" in ob.stages_s else None
        chain = next((c for c in encoder_chain if c.modality == m and c.precision == ob.precision
                      and c.device == "cpu"), None)
        if pre is not None and chain is not None:
            ours = pre + max(0.0, chain.ours_s - chain.plain_sessions_s)
            out.append(_target(f"our_share_of_ttft/{m}",
                               f"{m}: (reader + our encoder chain's time over plain session.run) / runtime best time "
                               f"to first token", ours / best.ttft_s, OUR_SHARE_OF_TTFT, "<="))
    return out


def _targets_v1(modalities: Sequence[str], encoder: Sequence[EncoderRow], decoder: Sequence[DecoderRow],
                decode_loop: Sequence[DecodeLoopRow], chat: ChatRow | None) -> list[Target]:
    """The version-1 bench targets."""
    out = []
    for m in modalities:
        torch_rows = _rows(encoder, modality=m, backend="torch", device="cpu")
        ort_rows = _runtime_cpu_encoders(encoder, m)
        if torch_rows and ort_rows:
            tb = min(torch_rows, key=lambda r: r.encode_s.median)
            ob = min(ort_rows, key=lambda r: r.encode_s.median)
            out.append(_target(
                f"encoder_best_vs_torch_best/{m}",
                f"{m}: torch best ({tb.precision}) time / runtime best CPU precision ({ob.precision}, "
                f"cosine {ob.cosine_vs_torch_fp32:.4f}) time",
                tb.encode_s.median / ob.encode_s.median, 1.0, ">="))
        t32 = _rows(encoder, modality=m, backend="torch", precision="fp32", device="cpu")
        o32 = _rows(encoder, modality=m, backend="onnxruntime", precision="fp32", device="cpu")
        if t32 and o32:
            out.append(_target(f"ort_fp32_vs_torch_fp32/{m}", f"{m}: torch eager fp32 time / onnxruntime fp32 time",
                               t32[0].encode_s.median / o32[0].encode_s.median, 1.5, ">="))
    m0 = modalities[0]
    q8 = _rows(decoder, modality=m0, backend="llama.cpp", precision="q8_0")
    t32 = _rows(decoder, modality=m0, backend="torch", precision="fp32")
    if q8 and t32:
        out.append(_target("q8_0_decode_vs_torch_fp32", "decode tokens/s: llama.cpp q8_0 / torch eager fp32",
                           q8[0].decode_tokens_per_s / t32[0].decode_tokens_per_s, 3.0, ">="))
    if q8:
        out.append(_target("q8_0_decode_fraction_of_bandwidth",
                           "q8_0 decode tokens/s / (bandwidth / bytes per token)",
                           q8[0].fraction_of_bandwidth_ceiling, 0.6, ">="))
    loop = next((r for r in decode_loop if r.quant == "q8_0"), decode_loop[0] if decode_loop else None)
    if loop:
        out.append(_target("decode_loop_vs_llama_cpp_python",
                           f"decode tokens/s, our Session / llama-cpp-python Llama.generate ({loop.quant}, same GGUF)",
                           loop.ratio, 0.95, ">="))
    if chat:
        out.append(_target("chat_followup_ttft_ratio", "follow-up turn's time to first token / first turn's",
                           chat.ratio, 0.30, "<="))
    return out


# ----------------------------------------------------------------------------- markdown


def _ms(stat: Stat | None) -> str:
    if stat is None or stat.median is None:
        return "-"
    med, lo, hi = stat.median * 1e3, stat.min * 1e3, stat.max * 1e3
    fmt = (lambda v: f"{v:.0f}") if med >= 100 else (lambda v: f"{v:.1f}") if med >= 1 else (lambda v: f"{v:.2f}")
    return f"{fmt(med)} ({fmt(lo)}-{fmt(hi)})" if stat.n > 1 else fmt(med)


def _f(v, digits=2, pct=False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.0f} %" if pct else f"{v:.{digits}f}"


def block_source(result: BenchResult) -> str:
    """Whose encoder block every decoder row got: torch fp32's when the torch rows ran, else the
    runtime's encoder in fp32 (or its first precision), as `bench._reference_rows` picks it."""
    if any(r.backend == "torch" and r.precision == "fp32" for r in result.encoder):
        return "torch fp32's"
    precs = result.settings.encoder_precisions
    return f"the runtime's {'fp32' if 'fp32' in precs else precs[0]} encoder's"


def to_markdown(result: BenchResult) -> str:
    """The report as Markdown tables (times in ms: median (min-max) over the repeats)."""
    mach, st, ceil = result.machine, result.settings, result.ceilings
    bw = ceil.bandwidth
    lines = [f"# onellm bench: preset `{result.preset}`", ""]
    if result.random_weights:
        lines += [f"> {result.notice}", ""]
    lines += [
        f"Machine: {mach.get('cpu_model')} ({mach.get('physical_cores')} cores, {mach.get('memory_gib')} GiB), "
        f"{mach.get('platform')}; load average at start {_f((mach.get('load_average') or [None])[0])}.",
        f"Versions: {', '.join(f'{k} {v}' for k, v in mach.get('versions', {}).items())}.",
        f"llama.cpp: `{mach.get('llama_cpp_system_info')}`",
        f"Settings: {st.repeats} timed runs after {st.warmup} warm-up; {st.new_tokens} greedy tokens; "
        f"{st.threads} threads. Times in ms: median (min-max).", "",
        "## Ceilings", "",
        f"- memory bandwidth: {_f(bw.gb_s.median, 1)} GB/s read ({bw.method}); "
        f"copy {_f(bw.copy_gb_s.median, 1)} GB/s (read + write), "
        f"one-thread copy {_f(bw.single_thread_copy_gb_s.median, 1)} GB/s",
    ]
    for key, g in ceil.gemm.rates().items():
        lines.append(f"- GEMM {ceil.gemm.n}^3 {key}: {_f(g.gflop_s.median, 0)} GFLOP/s ({g.library})")
    lines += ["", "## Encoder (batch 1)", "",
              "| modality | backend | precision | device | preprocess | tokenizer | CLIP trunk | UPM+proj | encode | "
              "GFLOP/s | % of peak | cosine vs fp32 | plain ORT sessions |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result.encoder:
        s = r.stages_s
        lines.append(
            f"| {r.modality} | {r.backend} | {r.precision} | {r.device} | {_ms(s.get('preprocess'))} | "
            f"{_ms(s.get('tokenizer'))} | {_ms(s.get('clip_trunk'))} | {_ms(s.get('upm_projection'))} | "
            f"**{_ms(r.encode_s)}** | {_f(r.gflop_s, 0)} | {_f(r.fraction_of_peak, pct=True)} | "
            f"{_f(r.cosine_vs_torch_fp32, 5)} | {_ms(r.plain_sessions_encode_s)} |")
    lines += ["", f"## Decoder (same encoder block for every row: {block_source(result)})", "",
              "| modality | backend | precision | load s | prefill ms | prefill tok/s | TTFT ms | decode tok/s | "
              "bytes/token | % of BW ceiling | greedy prefix match | top-1 agreement |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result.decoder:
        lines.append(
            f"| {r.modality} | {r.backend} | {r.precision} | {_f(r.load_s)} | {_ms(r.prefill_s)} | "
            f"{_f(r.prefill_tokens_per_s, 0)} | {_f(r.ttft_s * 1e3 if r.ttft_s is not None else None, 0)} | "
            f"**{_f(r.decode_tokens_per_s, 1)}** | {r.bytes_per_token / 2**20:.0f} MiB | "
            f"{_f(r.fraction_of_bandwidth_ceiling, pct=True)} | {_f(r.greedy_prefix_match)} | {_f(r.top1_agreement)} |")
    lines += ["", "TTFT = preprocess + encode (torch rows: same dtype; runtime rows: fastest runtime CPU encoder) "
              "+ prefill, from stage medians.", "", "## Runtime overhead", "",
              "| what | ours | plain | ours / plain |", "|---|---|---|---|"]
    for o in result.overhead.decode_loop:
        placed = o.llama_cpp_python.buffers
        both = f"both: {placed}" if placed else "both with extra CPU buffer types on"
        lines.append(f"| decode loop, {o.quant}: tok/s | {_f(o.ours.decode_tokens_per_s, 1)} | "
                     f"{_f(o.llama_cpp_python.decode_tokens_per_s, 1)} (llama-cpp-python; {both}) | "
                     f"{_f(o.ratio, 3)}{_paired(o.ratio_paired)} |")
        if o.ours_shipped is not None:
            shipped = ", ".join(x for x in ("" if o.ours_extra_bufts else "extra CPU buffer types off",
                                            f"{o.ours_kv_type} KV cache" if o.ours_kv_type not in (None, "f16") else "")
                                if x)
            lines.append(f"| decode loop, {o.quant}: tok/s | {_f(o.ours_shipped.decode_tokens_per_s, 1)} "
                         f"(ours as shipped: {shipped}) | "
                         f"{_f(o.llama_cpp_python.decode_tokens_per_s, 1)} "
                         f"({'llama-cpp-python, as above' if placed else 'llama-cpp-python defaults'}) | "
                         f"{_f(o.ratio_shipped, 3)}{_paired(o.ratio_shipped_paired)} |")
    for c in result.overhead.encoder_chain:
        lines.append(f"| encoder chain, {c.modality} {c.precision}: ms | {_f(c.ours_s * 1e3, 1)} | "
                     f"{_f(c.plain_sessions_s * 1e3, 1)} (one session.run per graph) | "
                     f"{_f(c.plain_sessions_s / c.ours_s, 3)} (plain/ours) |")
    chat = result.chat
    if chat:
        lines += ["", "## Chat follow-up", "",
                  f"{chat.modality}, {chat.precision} encoder, {chat.quant} decoder: first turn TTFT "
                  f"{_ms(chat.turn1_ttft_s)} ms ({chat.turn1_prefill_positions} positions prefilled), "
                  f"follow-up {_ms(chat.turn2_ttft_s)} ms ({chat.turn2_prefill_positions} positions, no "
                  f"re-encoding): ratio {_f(chat.ratio, 3)}. ({chat.definition}.)"]
    if result.footprint:
        lines += ["", "## Footprint (fresh process: load the bundle, answer once)", "",
                  "| encoder | decoder | context | KV cache | bundle load s | peak RSS MiB | over the files MiB |",
                  "|---|---|---|---|---|---|---|"]
        for f in result.footprint:
            if f.error is not None:
                lines.append(f"| {f.precision} | {f.quant} | | | error: {list(f.error)} | | |")
            else:
                over = (f"{f.peak_rss_mib - f.gguf_mib - f.encoder_mib:.0f}"
                        if f.gguf_mib is not None and f.encoder_mib is not None else "-")
                lines.append(f"| {f.precision} | {f.quant} | {f.n_ctx or '-'} | {f.kv_type or '-'} | {_f(f.load_s)} "
                             f"| {f.peak_rss_mib:.0f} | {over} |")
    lines += ["", "## Targets", "", "| target | measured | wanted | met |", "|---|---|---|---|"]
    for t in result.targets:
        met = "-" if t.met is None else ("yes" if t.met else "**no**")
        lines.append(f"| {t.description} | {_f(t.measured, 3)} | {t.comparison} {t.threshold} | {met} |")
    lines += ["", f"Whole run: {result.wall_s:.0f} s.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- chart


def write_chart(result: BenchResult, path: Path) -> bool:
    """Stacked per-stage latency per backend (left) and decode tokens/s vs the ceiling (right)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: skipping the chart %s (pip install 'onellm[bench]')", path)
        return False
    enc = [r for r in result.encoder if r.device == "cpu"]
    dec = {(r.modality, r.backend, r.precision): r for r in result.decoder}
    runtime_dec = [r for r in result.decoder if r.backend == "llama.cpp"]
    # the runtime's bars carry the prefill of its fastest-prefilling type: the best time to first token
    q_pref = (min(runtime_dec, key=lambda r: r.prefill_s.median or float("inf")).precision
              if runtime_dec else None)
    labels, segments = [], []
    stages = ("preprocess", "tokenizer", "clip_trunk", "upm_projection")
    for r in enc:
        if r.backend == "torch":
            d = dec.get((r.modality, "torch", r.precision))
            label = f"{r.modality}: torch {r.precision}"
        else:
            d = dec.get((r.modality, "llama.cpp", q_pref))
            label = f"{r.modality}: ORT {r.precision} + llama.cpp {q_pref}"
        seg = [(r.stages_s[s].median or 0.0) if s in r.stages_s else 0.0 for s in stages]
        seg.append(d.prefill_s.median if d else 0.0)
        labels.append(label)
        segments.append(seg)
    height = max(3.5, 0.45 * len(labels) + 1.5)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, height), gridspec_kw={"width_ratios": [3, 2]})
    below = -0.6 / max(1.0, height - 1.3)  # legends 0.6 inch under each axis, below its label
    names = ["preprocess", "tokenizer", "CLIP trunk", "UPM + projection", "prefill"]
    colors = ["#9e9e9e", "#8ecae6", "#219ebc", "#023047", "#fb8500"]
    left = [0.0] * len(labels)
    for k, name in enumerate(names):
        vals = [s[k] * 1e3 for s in segments]
        ax1.barh(labels, vals, left=left, color=colors[k], label=name)
        left = [a + b for a, b in zip(left, vals)]
    # log time axis: a 5 ms tokenizer and a 2 s prefill are both readable; the total at each bar's end
    ax1.set_xscale("log")
    totals = [sum(seg) * 1e3 for seg in segments]
    positive = [v * 1e3 for seg in segments for v in seg if v > 0]
    if positive:  # from half the smallest stage (a few-ms preprocess stays visible) to past the longest bar
        ax1.set_xlim(max(0.1, min(positive) / 2), max(totals) * 3)
    for i, total in enumerate(totals):
        ax1.text(total, i, f" {total:,.0f} ms", va="center", fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("ms (median, log scale) - time to first token, by stage")
    # legends below the axis labels; savefig's tight box takes them in
    ax1.legend(loc="upper center", bbox_to_anchor=(0.5, below), ncol=len(names), fontsize=8, frameon=False)
    ax1.set_title("Encoder stages + prefill per backend")
    m0 = result.settings.modalities[0]
    drows = [r for r in result.decoder if r.modality == m0]
    dl = [f"{r.backend} {r.precision}" for r in drows]
    ax2.barh(dl, [r.decode_tokens_per_s for r in drows], color="#ffb703", label="measured")
    ax2.scatter([r.bandwidth_ceiling_tokens_per_s or 0.0 for r in drows], dl, marker="|", s=300, color="k",
                label="bandwidth / bytes per token")
    for i, r in enumerate(drows):
        ceiling = r.bandwidth_ceiling_tokens_per_s
        note = f" {r.decode_tokens_per_s:.1f}" + (f" ({r.decode_tokens_per_s / ceiling:.0%} of ceiling)" if ceiling else "")
        ax2.text(max(r.decode_tokens_per_s, ceiling or 0.0), i, note, va="center", fontsize=8)  # clear of the tick
    top = max([r.decode_tokens_per_s for r in drows] + [r.bandwidth_ceiling_tokens_per_s or 0.0 for r in drows] + [1.0])
    ax2.set_xlim(0, top * 1.45)
    ax2.invert_yaxis()
    ax2.set_xlabel("decode tokens/s")
    ax2.legend(loc="upper center", bbox_to_anchor=(0.5, below), ncol=2, fontsize=8, frameon=False)
    ax2.set_title("Decode speed vs the bandwidth ceiling")
    title = f"onellm bench, preset {result.preset} - {result.machine.get('cpu_model')}"
    if result.random_weights:
        title += " (random weights)"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- files


def _clean(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None, Paths to str."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_reports(result: BenchResult, out_dir: str | Path, stem: str = "bench") -> dict[str, Path | None]:
    """Write <stem>.json, <stem>.md and <stem>.png into out_dir; returns their paths (png None if skipped)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path | None] = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(_clean(result.to_dict()), indent=1, allow_nan=False) + "\n")
    paths["md"].write_text(to_markdown(result))
    if not write_chart(result, paths["png"]):
        paths["png"] = None
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """Re-render the Markdown and the chart of a bench.json (e.g. one committed under results/)."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("json", help="a bench.json written by `onellm bench`")
    ap.add_argument("--out", default=None, help="directory for <stem>.md and <stem>.png (default: beside the JSON)")
    args = ap.parse_args(argv)
    src = Path(args.json)
    result = load_result(src)
    out = Path(args.out) if args.out else src.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{src.stem}.md").write_text(to_markdown(result))
    write_chart(result, out / f"{src.stem}.png")


if __name__ == "__main__":
    main()
