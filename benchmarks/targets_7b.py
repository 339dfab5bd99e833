"""Issue 13's 7B targets as measured ratios, from `onellm bench --preset 7b` and `torch_7b` results.

In: the bench's bench.json (7b preset, run with --no-torch) and, if it could run, the
torch_7b JSON. Out: a Markdown table on stdout (and --out), one line per target and quant
or modality, with the measured ratio and whether it meets the target:

- our decode (as shipped) >= 97 % of plain llama-cpp-python with its default settings
  (extra CPU buffer types on; `overhead.decode_loop`), per quant;
- nothing of ours above 2 % of TTFT: our prefill minus plain llama.cpp's (same GGUF) plus
  our encoder chain minus one plain session.run per graph, over the row's TTFT;
- peak RSS of a fresh process (bundle load + one answer) <= GGUF + the encoder files of its
  precision + 600 MiB (needs the bundle on disk);
- best runtime TTFT >= 2x torch bf16's and decode >= 2.5x, per modality (needs torch_7b).

Run: `python -m onellm.benchmarks.targets_7b bench7b-out/bench.json [--torch torch7b.json] [--out t.md]`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _med(x: Any) -> float:
    return float(x["median"]) if isinstance(x, dict) else float(x)


def evaluate(bench: dict[str, Any], torch_rows: dict[str, Any] | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    bundle = Path(bench["artifacts"]["bundle"])
    for o in bench.get("overhead", {}).get("decode_loop", []):
        ours = o.get("ours_shipped", o["ours"])
        paired = o.get("ratio_shipped_paired") if "ours_shipped" in o else o.get("ratio_paired")
        if paired:  # the median of per-round ratios (runs before it: the ratio of the medians)
            ratio, how = paired["median"], "median of per-round ratios"
        else:
            ratio, how = ours["decode_tokens_per_s"] / o["llama_cpp_python"]["decode_tokens_per_s"], "ratio of medians"
        out.append({"target": f"decode {o['quant']}: ours as shipped / plain llama-cpp-python defaults ({how})",
                    "value": ratio, "wanted": ">= 0.97", "met": ratio >= 0.97})
    enc_extra = {}
    for e in bench.get("overhead", {}).get("encoder_chain", []):
        enc_extra[e["modality"]] = max(enc_extra.get(e["modality"], 0.0), e["ours_s"] - e["plain_sessions_s"])
    loops = {o["quant"]: o for o in bench.get("overhead", {}).get("decode_loop", [])}
    for d in bench.get("decoder", []):
        if d["backend"] != "llama.cpp" or d["precision"] not in loops:
            continue
        o = loops[d["precision"]]
        ours = o.get("ours_shipped", o["ours"])
        extra = max(0.0, _med(ours["prefill_s"]) - _med(o["llama_cpp_python"]["prefill_s"]))
        extra += max(0.0, enc_extra.get(d["modality"], 0.0))
        share = extra / d["ttft_s"] if d.get("ttft_s") else float("nan")
        out.append({"target": f"ours in TTFT, {d['modality']} {d['precision']} (TTFT {d['ttft_s']:.2f} s)",
                    "value": share, "wanted": "<= 0.02", "met": share <= 0.02})
    for f in bench.get("footprint", []):
        gguf = bundle / f"decoder-{f['quant']}.gguf"
        if "peak_rss_mib" not in f or not gguf.is_file():  # an error row, or the bundle is gone
            continue
        enc_bytes = sum(p.stat().st_size for p in (bundle / "encoder").glob(f"*.{f['precision']}.onnx"))
        limit = (gguf.stat().st_size + enc_bytes) / 2**20 + 600
        ctx = f" at {f['n_ctx']} positions, {f.get('kv_type', 'f16')} cache" if f.get("n_ctx") else ""
        out.append({"target": f"peak RSS {f['precision']}+{f['quant']}{ctx} ({f['peak_rss_mib']:.0f} MiB) / "
                              f"(GGUF + encoder + 600 MiB = {limit:.0f})",
                    "value": f["peak_rss_mib"] / limit, "wanted": "<= 1", "met": f["peak_rss_mib"] <= limit})
    if torch_rows:
        for t in torch_rows["rows"]:
            mine = [d for d in bench.get("decoder", []) if d["modality"] == t["modality"] and d["backend"] == "llama.cpp"]
            if not mine:
                continue
            best = min(mine, key=lambda d: d["ttft_s"])
            r = t["ttft_s"] / best["ttft_s"]
            out.append({"target": f"TTFT {t['modality']}: torch bf16 / our best ({best['precision']})",
                        "value": r, "wanted": ">= 2", "met": r >= 2})
            fastest = max(mine, key=lambda d: d["decode_tokens_per_s"])
            r = fastest["decode_tokens_per_s"] / _med(t["decode_tok_s"])
            out.append({"target": f"decode {t['modality']}: ours ({fastest['precision']}) / torch bf16",
                        "value": r, "wanted": ">= 2.5", "met": r >= 2.5})
    return out


def to_markdown(rows: list[dict[str, Any]], bench: dict[str, Any]) -> str:
    m = bench.get("machine", {})
    la = m.get("load_average", ["?"])
    lines = [f"7B targets: CPU {m.get('cpu_model', '?')}, load average at start {la[0]}, at end "
             f"{(m.get('load_average_end') or ['?'])[0]}", "", "| target | measured | wanted | met |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['value']:.3f} | {r['wanted']} | {'yes' if r['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m onellm.benchmarks.targets_7b", description=__doc__.split("\n")[0])
    ap.add_argument("bench_json", type=Path)
    ap.add_argument("--torch", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    bench = json.loads(args.bench_json.read_text())
    torch_rows = json.loads(args.torch.read_text()) if args.torch and args.torch.is_file() else None
    md = to_markdown(evaluate(bench, torch_rows), bench)
    if args.out:
        args.out.write_text(md)
    print(md, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
