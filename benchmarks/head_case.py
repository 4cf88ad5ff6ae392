"""One head benchmark case in its own process: fit and score, fre_torch or scikit-learn, time and peak memory.

    python -m benchmarks.head_case '{"impl": "fre_torch", "n": 400, "d": 65536}'
"""

from __future__ import annotations

import gc
import json
import sys

import torch

from benchmarks.common import best_of, current_rss_bytes, low_rank_features, peak_rss_bytes, reset_peak_rss


def main(args: dict) -> dict:
    impl, n, d = args["impl"], int(args["n"]), int(args["d"])
    repeat = int(args.get("repeat", 3))
    device = args.get("device", "cpu")
    if impl == "sklearn":
        from sklearn.decomposition import PCA as SkPCA
    else:
        from fre_torch import PCA  # imported before the baseline RSS is taken
    x = low_rank_features(n, d)
    x_test = low_rank_features(min(n, 400), d, seed=1)
    gc.collect()
    base = current_rss_bytes()
    reset_peak_rss()
    result = {"impl": impl, "n": n, "d": d, "input_bytes": x.nbytes}
    if impl == "sklearn":
        holder = {}

        def fit():
            holder["m"] = SkPCA(0.97).fit(x)

        def score():
            m = holder["m"]
            return ((x_test - m.inverse_transform(m.transform(x_test))) ** 2).sum(axis=1)
    else:
        xt = torch.from_numpy(x).to(device)
        xtt = torch.from_numpy(x_test).to(device)
        holder = {}
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def fit():
            holder["m"] = PCA(0.97, device=device).fit(xt)
            holder["m"].subspace_  # noqa: B018 - the fit is complete
            sync()

        def score():
            out = holder["m"].subspace_.fre(xtt)
            sync()
            return out

    # Peak memory of one cold fit (repeated fits only add allocator fragmentation), then the best time.
    t_first = best_of(fit, 1)
    result["fit_peak_extra_bytes"] = max(peak_rss_bytes() - base, 0)
    result["fit_s"] = t_first if args.get("slow") else min(t_first, best_of(fit, repeat))
    result["n_components"] = int(holder["m"].n_components_)
    result["score_rows"] = x_test.shape[0]
    result["score_s"] = best_of(score, 5)
    return result


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
