"""Streaming covariance fit, N rows of D features in batches, in its own process: time and peak memory.

    python -m benchmarks.stream_case '{"impl": "fre_torch", "n": 200000, "d": 256, "batch": 4096}'

fre_torch never holds more than one batch; scikit-learn gets the whole (N, D) array (as it needs).
"""

from __future__ import annotations

import gc
import json
import sys

import numpy as np
import torch

from benchmarks.common import best_of, current_rss_bytes, low_rank_features, peak_rss_bytes, reset_peak_rss


def batches(n: int, d: int, batch: int):
    for i, start in enumerate(range(0, n, batch)):
        yield low_rank_features(min(batch, n - start), d, seed=100 + i)


def main(args: dict) -> dict:
    impl, n, d, batch = args["impl"], int(args["n"]), int(args["d"]), int(args["batch"])
    result = {"impl": impl, "n": n, "d": d, "batch": batch}
    if impl == "sklearn":
        from sklearn.decomposition import PCA as SkPCA

        x = np.concatenate(list(batches(n, d, batch)))
        solver = args.get("svd_solver", "auto")
        gc.collect()
        base = current_rss_bytes()
        reset_peak_rss()
        result["fit_s"] = best_of(lambda: SkPCA(0.97, svd_solver=solver).fit(x), 3)
        result["svd_solver"] = solver
        result["data_bytes"] = x.nbytes  # scikit-learn must hold the whole array
    else:
        from fre_torch import CovarianceAccumulator, fit_covariance

        def fit(source):
            acc = CovarianceAccumulator(d)
            for b in source:
                acc.update(b, check_finite=False)
            return fit_covariance(acc, 0.97)

        if args.get("generate"):
            # Memory: each batch is generated, streamed in and dropped, so the peak is one batch + D x D moments.
            gc.collect()
            base = current_rss_bytes()
            reset_peak_rss()
            fit(torch.from_numpy(b) for b in batches(n, d, batch))
            result["peak_extra_bytes"] = max(peak_rss_bytes() - base, 0)
            result["data_bytes"] = batch * d * 4  # one float32 batch at a time
        # Time: the batches are prepared first (as scikit-learn's array is), so only the fit is timed.
        data = [torch.from_numpy(b) for b in batches(n, d, batch)]
        result["fit_s"] = best_of(lambda: fit(data), 3)
        return result
    result["peak_extra_bytes"] = max(peak_rss_bytes() - base, 0)
    return result


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
