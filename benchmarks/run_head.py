"""Side-by-side head benchmark: fre_torch vs scikit-learn, fit and FRE scoring, time, ratio and peak memory.

    python -m benchmarks.run_head [--quick] [--out benchmarks/results/head.json]

Each case runs in a fresh process so its peak RSS is its own; the table is printed as Markdown for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import machine, run_child, write_section

GRID_D = (4096, 16384, 65536)
GRID_N = (100, 400, 2000)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only N=400, D=65536 and the streaming case")
    ap.add_argument("--skip_sklearn_above", type=int, default=400 * 65536,
                    help="skip scikit-learn fits on larger N*D (minutes each); marked n/a")
    ap.add_argument("--out", default="benchmarks/results/head.json")
    ap.add_argument("--stream_only", action="store_true", help="rerun only the streaming case, keep the grid")
    ap.add_argument("--write", action="store_true", help="also replace the generated head table in BENCHMARKS.md")
    args = ap.parse_args()

    cases = [(400, 65536)] if args.quick else [(n, d) for d in GRID_D for n in GRID_N]
    if args.stream_only:
        cases = []
    rows = json.loads(Path(args.out).read_text())["cases"] if args.stream_only else []
    for n, d in cases:
        ours = run_child("benchmarks.head_case", {"impl": "fre_torch", "n": n, "d": d})
        ref = None
        if n * d <= args.skip_sklearn_above:
            ref = run_child("benchmarks.head_case", {"impl": "sklearn", "n": n, "d": d, "slow": n * d > 2e7})
        rows.append({"n": n, "d": d, "fre_torch": ours, "sklearn": ref})
        print(json.dumps(rows[-1]), flush=True)
    stream = {
        "fre_torch": run_child("benchmarks.stream_case", {"impl": "fre_torch", "n": 200000, "d": 256,
                                                          "batch": 4096, "generate": True}),
        "fre_torch_50k": run_child("benchmarks.stream_case", {"impl": "fre_torch", "n": 50000, "d": 256,
                                                              "batch": 4096, "generate": True}),
        "sklearn_auto": run_child("benchmarks.stream_case", {"impl": "sklearn", "n": 200000, "d": 256,
                                                             "batch": 4096}),
        "sklearn_full": run_child("benchmarks.stream_case", {"impl": "sklearn", "n": 200000, "d": 256,
                                                             "batch": 4096, "svd_solver": "full"}),
    }
    print(json.dumps(stream), flush=True)
    doc = {"machine": machine(), "cases": rows, "stream": stream}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(markdown(doc))
    if args.write:
        print(f"wrote {write_section('head', markdown(doc))}")


def _mb(b: float) -> str:
    return f"{b / 2**20:.0f}"


def markdown(doc: dict) -> str:
    out = [f"Machine: {doc['machine']}", "",
           "| N | D | k | fit fre_torch s | fit sklearn s | fit ratio | score min(N, 400) rows fre_torch ms | "
           "score sklearn ms | score ratio | fit peak extra MiB (x input) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["cases"]:
        o, s = r["fre_torch"], r["sklearn"]
        mem = f"{_mb(o['fit_peak_extra_bytes'])} ({o['fit_peak_extra_bytes'] / o['input_bytes']:.2f}x)"
        if s:
            out.append(f"| {r['n']} | {r['d']} | {o['n_components']} | {o['fit_s']:.3f} | {s['fit_s']:.2f} | "
                       f"{s['fit_s'] / o['fit_s']:.1f}x | {o['score_s'] * 1e3:.1f} | {s['score_s'] * 1e3:.1f} | "
                       f"{s['score_s'] / o['score_s']:.1f}x | {mem} |")
        else:
            out.append(f"| {r['n']} | {r['d']} | {o['n_components']} | {o['fit_s']:.3f} | n/a | n/a | "
                       f"{o['score_s'] * 1e3:.1f} | n/a | n/a | {mem} |")
    st = doc["stream"]
    out += ["", "Streaming covariance, D = 256, batches of 4,096 rows (fre_torch generates each batch and drops it; "
            "scikit-learn gets the whole float32 array):", "",
            "| run | N | fit s | data held MiB | fit peak extra MiB |", "|---|---|---|---|---|"]
    for key, label in [("fre_torch_50k", "fre_torch streaming"), ("fre_torch", "fre_torch streaming"),
                       ("sklearn_auto", "sklearn PCA(0.97) (auto = covariance_eigh)"),
                       ("sklearn_full", "sklearn PCA(0.97, svd_solver='full')")]:
        v = st[key]
        out.append(f"| {label} | {v['n']} | {v['fit_s']:.3f} | {_mb(v.get('data_bytes', 0))} | "
                   f"{_mb(v['peak_extra_bytes'])} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
