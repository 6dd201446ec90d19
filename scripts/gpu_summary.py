"""Summary table of a GPU suite run against the issue's Done-when targets (markdown on stdout).

    python scripts/gpu_summary.py results/gpu/nvidia-h100-80gb-hbm3
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(path: Path) -> dict[str, dict]:
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows[r["cell_id"]] = r
    return rows


def main(run_dir: str) -> int:
    d = Path(run_dir)
    rows = load(d / "results.jsonl")

    def m(method: str, task: str, key: str, model: str = "llama-2-7b"):
        r = rows.get(f"{model}|{method}|{task}")
        return None if r is None or r["status"] != "ok" else r["metrics"].get(key)

    device = next((n.split(": ", 1)[1] for r in rows.values() for n in r.get("notes", []) if n.startswith("device: ")), "?")
    methods = [k.split("|")[1] for k in rows if k.endswith("|decode")]
    out = [f"# GPU suite on {device}", "", "Llama-2-7B shape, random fp16 weights, fp16 activations; "
           "batch 8 x context 8192 unless stated.", ""]
    out += ["| method | KV GB (8 x 8208) | KV bits/elt | decode step ms (p50) | tok/s | captured | "
            "attention ms | x SDPA | of copy BW | unfused ms | max batch (4096+256) | tok/s at max batch |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, fmt="{:.3g}"):
        return "-" if x is None else fmt.format(x)

    for meth in methods:
        out.append("| " + " | ".join([
            meth, f(m(meth, "peak-memory", "kv_gb"), "{:.2f}"), f(m(meth, "peak-memory", "kv_bits_per_element"), "{:.2f}"),
            f(m(meth, "decode", "decode_ms_p50"), "{:.1f}"), f(m(meth, "decode", "tokens_per_s"), "{:.0f}"),
            {1.0: "yes", 0.0: "no", None: "-"}[m(meth, "decode", "graph")],
            f(m(meth, "decode", "attn_ms_p50"), "{:.3f}"), f(m(meth, "decode", "attn_speedup_vs_sdpa"), "{:.2f}"),
            f(m(meth, "decode", "attn_frac_copy_bw"), "{:.0%}"), f(m(meth, "decode", "unfused_attn_ms_p50"), "{:.2f}"),
            f(m(meth, "max-batch", "max_batch"), "{:.0f}"), f(m(meth, "max-batch", "throughput_tok_s"), "{:.0f}"),
        ]) + " |")
    for peer in ("peer-hf-dynamic", "peer-hf-static", "peer-hf-quantized"):
        r = rows.get(f"llama-2-7b|fp16|{peer}")
        if r is None:
            continue
        if r["metrics"].get("skipped"):
            out.append(f"| fp16 {peer} | {r['notes'][0]} |||||||||||")
        else:
            out.append(f"| fp16 {peer} (eager) | | | {r['metrics']['decode_ms_p50']:.1f} | "
                       f"{r['metrics']['tokens_per_s']:.0f} | no | | | | | | |")

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    rk, fp = "rotatekv-2", "fp16"
    checks = [
        ("KV bytes fp16 / RotateKV-2 >= 6.5x", ratio(m(fp, "peak-memory", "kv_gb"), m(rk, "peak-memory", "kv_gb")), 6.5),
        ("Max batch RotateKV-2 / fp16 >= 6x", ratio(m(rk, "max-batch", "max_batch"), m(fp, "max-batch", "max_batch")), 6.0),
        ("Throughput at own max batch RotateKV-2 / fp16 >= 3.5x",
         ratio(m(rk, "max-batch", "throughput_tok_s"), m(fp, "max-batch", "throughput_tok_s")), 3.5),
        ("Decode step fp16 / RotateKV-2 (both captured) >= 2x",
         ratio(m(fp, "decode", "decode_ms_p50"), m(rk, "decode", "decode_ms_p50")), 2.0),
        ("Decode step stock DynamicCache / RotateKV-2 >= 10x",
         ratio(m(fp, "peer-hf-dynamic", "decode_ms_p50"), m(rk, "decode", "decode_ms_p50")), 10.0),
        ("Attention KIVI-2 vs SDPA >= 4x", m("kivi-2", "decode", "attn_speedup_vs_sdpa"), 4.0),
        ("Attention KIVI-2 fraction of copy BW >= 60%", m("kivi-2", "decode", "attn_frac_copy_bw"), 0.6),
        ("Attention quarot-2 vs SDPA >= 4x", m("quarot-2", "decode", "attn_speedup_vs_sdpa"), 4.0),
        ("Attention quarot-2 fraction of copy BW >= 60%", m("quarot-2", "decode", "attn_frac_copy_bw"), 0.6),
        ("Attention RotateKV-2 vs SDPA >= 3x", m(rk, "decode", "attn_speedup_vs_sdpa"), 3.0),
    ]
    out += ["", "| Done-when target | measured | met |", "|---|---|---|"]
    for name, value, target in checks:
        met = "-" if value is None else ("met" if value >= target else "not met")
        shown = "-" if value is None else (f"{value:.0%}" if "BW" in name else f"{value:.2f}x")
        out.append(f"| {name} | {shown} | {met} |")
    smol = load(d / "smollm2_results.jsonl")
    if smol:
        out += ["", "SmolLM2-135M WikiText-2 perplexity on the GPU (8 x 1024, fp16):", "",
                "| method | simulated | packed | rel. diff |", "|---|---|---|---|"]
        for base in ("kivi-2", "rotatekv-2"):
            s = smol.get(f"smollm2-135m|{base}-sim|perplexity")
            p = smol.get(f"smollm2-135m|{base}-packed|perplexity")
            if s and p and s["status"] == p["status"] == "ok":
                a, b = s["metrics"]["ppl"], p["metrics"]["ppl"]
                out.append(f"| {base} | {a:.4f} | {b:.4f} | {100 * (b / a - 1):+.3f}% |")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "results/gpu/nvidia-h100-80gb-hbm3"))
