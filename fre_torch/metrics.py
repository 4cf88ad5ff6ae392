"""Threshold-free detection metrics in pure torch: ROC / AUROC, precision-recall / AUPR and maximal F1.

All functions take ``scores`` (higher = more anomalous) and ``labels`` (1 / True = anomalous) of the same shape on
the same device; any shape is accepted and flattened, so pixel metrics take ``maps: (N, H, W)`` and
``masks: (N, H, W)`` directly. Results live on the input device and equal scikit-learn's, ties included:

- ``auroc`` = ``sklearn.metrics.roc_auc_score``;
- ``aupr`` = ``sklearn.metrics.auc(recall, precision)`` over ``sklearn.metrics.precision_recall_curve``
  (trapezoid rule, including sklearn's final (recall 0, precision 1) point). This is *not* average precision.

Cost: one sort and one cumulative sum, O(N log N) time and O(N) memory (a peak of about 21 bytes per element beyond
the inputs for float32 scores and bool labels: sorted scores, sort indices, float64 cumulative sum), so they run on
tens of millions of pixels. Counts are accumulated in
float64 and are exact up to 2**53 elements. Validation needs one small host sync; extracting the distinct thresholds
needs another (``nonzero``).
"""

from __future__ import annotations

import torch

__all__ = ["roc_curve", "auroc", "precision_recall_curve", "aupr", "f1_max"]


def _validate(scores: torch.Tensor, labels: torch.Tensor, need_negatives: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks the inputs and returns them flattened: ``scores: (N,)`` real, ``labels: (N,)`` bool."""
    if not isinstance(scores, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"scores and labels must be torch.Tensors, got {type(scores).__name__} and {type(labels).__name__}; "
            "wrap them with torch.as_tensor"
        )
    if scores.dtype == torch.bool or scores.is_complex():
        raise TypeError(f"scores must be a real floating or integer tensor, got dtype {scores.dtype}")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be a bool or integer tensor (1 = anomalous), got dtype {labels.dtype}")
    if scores.shape != labels.shape:
        raise ValueError(
            f"scores and labels must have the same shape, got {tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    if scores.numel() == 0:
        raise ValueError("scores and labels are empty: a metric needs at least one normal and one anomalous sample")
    if scores.device != labels.device:
        raise ValueError(
            f"scores are on {scores.device} but labels on {labels.device}; move both to one device first"
        )
    scores = scores.reshape(-1)
    labels = labels.reshape(-1)
    # One host sync for every check: [number of NaN scores, number of labels outside {0, 1}, number of positives].
    if labels.dtype == torch.bool:
        bad_labels = torch.zeros((), dtype=torch.int64, device=labels.device)
    else:
        bad_labels = ((labels != 0) & (labels != 1)).sum()
        labels = labels != 0
    n_nan = torch.isnan(scores).sum() if scores.is_floating_point() else torch.zeros_like(bad_labels)
    n_nan, n_bad, n_pos = torch.stack([n_nan, bad_labels, labels.sum()]).tolist()
    if n_nan:
        raise ValueError(f"scores contain {n_nan} NaN value(s); a metric cannot rank them (check the scoring step)")
    if n_bad:
        raise ValueError(
            f"labels must be 0 (normal) or 1 (anomalous) but {n_bad} value(s) are neither; "
            "binarise them first, e.g. labels = masks > 0"
        )
    n = scores.numel()
    if n_pos == 0 or (need_negatives and n_pos == n):
        present = "normal" if n_pos == 0 else "anomalous"
        raise ValueError(
            f"only one class is present in labels (all {n} samples are {present}): the metric is undefined; "
            "evaluate on a set with both normal (label 0) and anomalous (label 1) samples"
        )
    return scores, labels


def _counts(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """False and true positive counts at each distinct threshold, thresholds decreasing.

    Args:
        scores: (N,) real scores, no NaN.
        labels: (N,) bool, True = anomalous.

    Returns:
        ``(fps, tps, thresholds)``, each (T,) with T the number of distinct scores; ``fps`` and ``tps`` float64
        counts of samples with ``score >= thresholds[i]``, ``thresholds`` in the dtype of ``scores``.
    """
    sorted_scores, order = torch.sort(scores, descending=True)
    tps_all = torch.cumsum(labels[order], dim=0, dtype=torch.float64)  # (N,)
    del order
    # The last index of each run of equal scores closes one threshold (sklearn's `threshold_idxs`).
    is_last = torch.empty_like(sorted_scores, dtype=torch.bool)
    torch.ne(sorted_scores[1:], sorted_scores[:-1], out=is_last[:-1])
    is_last[-1] = True
    idx = is_last.nonzero().squeeze(1)  # (T,)
    del is_last
    tps = tps_all[idx]
    del tps_all
    fps = idx.to(torch.float64).add_(1).sub_(tps)
    return fps, tps, sorted_scores[idx]


def _trapezoid(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Area under the polyline through ``(x[i], y[i])`` by the trapezoid rule (``numpy.trapezoid(y, x)``)."""
    return (torch.diff(x) * (y[1:] + y[:-1])).sum() / 2


def roc_curve(
    scores: torch.Tensor, labels: torch.Tensor, drop_intermediate: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Receiver operating characteristic, one point per distinct threshold (``sklearn.metrics.roc_curve``).

    Args:
        scores: (N,) or any shape, real; higher = more anomalous.
        labels: same shape as ``scores``, bool or integer in {0, 1}; 1 = anomalous.
        drop_intermediate: drop collinear points as scikit-learn does by default (the area is unchanged).

    Returns:
        ``(fpr, tpr, thresholds)``, each (T + 1,): ``fpr`` and ``tpr`` float64 and non-decreasing, ``thresholds``
        float64 and decreasing, starting at ``inf`` (the (0, 0) point); a sample is flagged when
        ``score >= threshold``.

    Raises:
        ValueError: shapes differ, inputs are empty, scores contain NaN, labels are not in {0, 1}, or only one
            class is present.
    """
    scores, labels = _validate(scores, labels, need_negatives=True)
    fps, tps, thresholds = _counts(scores, labels)
    thresholds = thresholds.to(torch.float64)
    if drop_intermediate and fps.numel() > 2:
        corner = torch.ones_like(fps, dtype=torch.bool)
        corner[1:-1] = (torch.diff(fps, n=2) != 0) | (torch.diff(tps, n=2) != 0)
        fps, tps, thresholds = fps[corner], tps[corner], thresholds[corner]
    zero = fps.new_zeros(1)
    fpr = torch.cat([zero, fps]).div_(fps[-1])
    tpr = torch.cat([zero, tps]).div_(tps[-1])
    thresholds = torch.cat([thresholds.new_full((1,), float("inf")), thresholds])
    return fpr, tpr, thresholds


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve, equal to ``sklearn.metrics.roc_auc_score`` (ties count half).

    Args:
        scores: (N,) or any shape, real; higher = more anomalous.
        labels: same shape as ``scores``, bool or integer in {0, 1}; 1 = anomalous.

    Returns:
        0-dim float64 tensor in [0, 1] on the input device.

    Raises:
        ValueError: as ``roc_curve``; in particular when only one class is present.
    """
    scores, labels = _validate(scores, labels, need_negatives=True)
    fps, tps, _ = _counts(scores, labels)
    zero = fps.new_zeros(1)
    # Trapezoid on integer counts (exact in float64), normalised once.
    return _trapezoid(torch.cat([zero, fps]), torch.cat([zero, tps])) / (fps[-1] * tps[-1])


def precision_recall_curve(
    scores: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Precision-recall curve, equal to ``sklearn.metrics.precision_recall_curve`` (``drop_intermediate=False``).

    Args:
        scores: (N,) or any shape, real; higher = more anomalous.
        labels: same shape as ``scores``, bool or integer in {0, 1}; 1 = anomalous.

    Returns:
        ``(precision, recall, thresholds)``: ``precision`` and ``recall`` (T + 1,) float64 with recall
        non-increasing and a final point (recall 0, precision 1); ``thresholds`` (T,) increasing, in the dtype of
        ``scores``; ``precision[i]`` and ``recall[i]`` flag samples with ``score >= thresholds[i]``.

    Raises:
        ValueError: shapes differ, inputs are empty, scores contain NaN, labels are not in {0, 1}, or no sample
            is anomalous.
    """
    scores, labels = _validate(scores, labels, need_negatives=False)
    fps, tps, thresholds = _counts(scores, labels)
    one = fps.new_ones(1)
    precision = torch.cat([torch.flip(tps / (tps + fps), (0,)), one])
    recall = torch.cat([torch.flip(tps / tps[-1], (0,)), one - 1])
    return precision, recall, torch.flip(thresholds, (0,))


def aupr(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Area under the precision-recall curve by the trapezoid rule.

    Equals ``sklearn.metrics.auc(recall, precision)`` on ``sklearn.metrics.precision_recall_curve``, including its
    final (recall 0, precision 1) point. This is not average precision (step interpolation).

    Args:
        scores: (N,) or any shape, real; higher = more anomalous.
        labels: same shape as ``scores``, bool or integer in {0, 1}; 1 = anomalous.

    Returns:
        0-dim float64 tensor in [0, 1] on the input device.

    Raises:
        ValueError: as ``precision_recall_curve``.
    """
    scores, labels = _validate(scores, labels, need_negatives=False)
    fps, tps, _ = _counts(scores, labels)
    # Points in increasing recall order, starting with sklearn's (recall 0, precision 1); no flip needed.
    one = fps.new_ones(1)
    recall = torch.cat([one - 1, tps / tps[-1]])
    precision = torch.cat([one, tps / (tps + fps)])
    return _trapezoid(recall, precision)


def f1_max(
    scores: torch.Tensor, labels: torch.Tensor, return_threshold: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Largest F1 score over all thresholds ``score >= t``.

    ``F1 = 2 TP / (2 TP + FP + FN)`` at every distinct threshold of the precision-recall curve. Picking the
    threshold with test labels is an oracle: report it, never use it to score new data.

    Args:
        scores: (N,) or any shape, real; higher = more anomalous.
        labels: same shape as ``scores``, bool or integer in {0, 1}; 1 = anomalous.
        return_threshold: also return the threshold reaching the maximum (the highest one on ties).

    Returns:
        0-dim float64 tensor, or ``(f1, threshold)`` with ``threshold`` 0-dim in the dtype of ``scores``.

    Raises:
        ValueError: as ``precision_recall_curve``.
    """
    scores, labels = _validate(scores, labels, need_negatives=False)
    fps, tps, thresholds = _counts(scores, labels)
    f1 = 2 * tps / (tps + fps + tps[-1])  # tps + fps + positives = 2 TP + FP + FN
    best = torch.argmax(f1)
    if return_threshold:
        return f1[best], thresholds[best]
    return f1[best]
