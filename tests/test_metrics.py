"""fre_torch.detection.metrics against scikit-learn, ties included, and its documented errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import NEEDS_CUDA
from sklearn import metrics as skm

from fre_torch.detection.metrics import aupr, auroc, f1_max, precision_recall_curve, roc_curve


def _sk_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    precision, recall, _ = skm.precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return float(f1.max())


def _cases() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    cases = []
    for n in (3, 17, 200, 5000):
        labels = torch.rand(n, generator=g) < 0.3
        labels[0], labels[-1] = True, False  # both classes
        scores = torch.randn(n, generator=g) + 1.5 * labels
        cases.append((f"random{n}", scores, labels))
        # Heavy ties: scores rounded to a handful of values.
        cases.append((f"tied{n}", torch.round(scores * 1.5) / 1.5, labels))
        cases.append((f"tied2_{n}", (scores > 0.7).float(), labels.long()))
    lab = torch.tensor([0, 0, 1, 1, 1])
    cases.append(("perfect", torch.tensor([0.1, 0.2, 0.8, 0.9, 1.0]), lab))
    cases.append(("inverted", torch.tensor([1.0, 0.9, 0.2, 0.1, 0.0]), lab))
    cases.append(("all_tied", torch.full((5,), 0.5), lab))
    cases.append(("n2", torch.tensor([0.3, 0.7]), torch.tensor([0, 1])))
    cases.append(("n2_inverted", torch.tensor([0.3, 0.7]), torch.tensor([1, 0])))
    cases.append(("n2_tied", torch.tensor([0.5, 0.5]), torch.tensor([True, False])))
    cases.append(("float64", torch.randn(300, generator=g, dtype=torch.float64), torch.arange(300) % 3 == 0))
    cases.append(("int_scores", torch.randint(0, 4, (300,), generator=g), torch.arange(300) % 2))
    return cases


CASES = _cases()
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("name,scores,labels", CASES, ids=IDS)
def test_auroc_matches_sklearn(name, scores, labels):
    got = auroc(scores, labels)
    assert got.dtype == torch.float64 and got.ndim == 0
    assert got.item() == pytest.approx(skm.roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-6)


@pytest.mark.parametrize("name,scores,labels", CASES, ids=IDS)
@pytest.mark.parametrize("drop", [False, True])
def test_roc_curve_matches_sklearn(name, scores, labels, drop):
    fpr, tpr, thr = roc_curve(scores, labels, drop_intermediate=drop)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(labels.numpy(), scores.numpy(), drop_intermediate=drop)
    np.testing.assert_allclose(fpr.numpy(), sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr.numpy(), sk_tpr, atol=1e-12)
    np.testing.assert_array_equal(thr.numpy(), sk_thr.astype(np.float64))
    assert skm.auc(fpr.numpy(), tpr.numpy()) == pytest.approx(auroc(scores, labels).item(), abs=1e-12)


@pytest.mark.parametrize("name,scores,labels", CASES, ids=IDS)
def test_pr_curve_and_aupr_match_sklearn(name, scores, labels):
    precision, recall, thr = precision_recall_curve(scores, labels)
    sk_p, sk_r, sk_t = skm.precision_recall_curve(labels.numpy(), scores.numpy())
    np.testing.assert_allclose(precision.numpy(), sk_p, atol=1e-12)
    np.testing.assert_allclose(recall.numpy(), sk_r, atol=1e-12)
    np.testing.assert_array_equal(thr.numpy(), sk_t)
    got = aupr(scores, labels)
    assert got.dtype == torch.float64 and got.ndim == 0
    assert got.item() == pytest.approx(skm.auc(sk_r, sk_p), abs=1e-6)


@pytest.mark.parametrize("name,scores,labels", CASES, ids=IDS)
def test_f1_max_matches_sklearn_and_its_threshold(name, scores, labels):
    f1, thr = f1_max(scores, labels, return_threshold=True)
    expected = _sk_f1_max(scores.numpy(), labels.numpy())
    assert f1.item() == pytest.approx(expected, abs=1e-9)
    assert f1_max(scores, labels).item() == f1.item()
    assert thr.dtype == scores.dtype and thr.ndim == 0
    # The returned threshold reaches the maximum when applied as `score >= threshold`.
    assert skm.f1_score(labels.numpy(), (scores >= thr).numpy()) == pytest.approx(expected, abs=1e-9)


def test_closed_forms():
    lab = torch.tensor([0, 0, 1, 1])
    assert auroc(torch.tensor([0.0, 1.0, 2.0, 3.0]), lab).item() == 1.0
    assert auroc(torch.tensor([3.0, 2.0, 1.0, 0.0]), lab).item() == 0.0
    assert auroc(torch.zeros(4), lab).item() == 0.5
    assert aupr(torch.tensor([0.0, 1.0, 2.0, 3.0]), lab).item() == 1.0
    assert f1_max(torch.tensor([0.0, 1.0, 2.0, 3.0]), lab, return_threshold=True) == (1.0, 2.0)


def test_any_shape_is_flattened_and_inputs_not_mutated():
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(3, 8, 8, generator=g)
    masks = torch.rand(3, 8, 8, generator=g) < 0.2
    maps_copy, masks_copy = maps.clone(), masks.clone()
    assert auroc(maps, masks).item() == auroc(maps.flatten(), masks.flatten()).item()
    assert aupr(maps, masks).item() == aupr(maps.flatten(), masks.flatten()).item()
    assert torch.equal(maps, maps_copy) and torch.equal(masks, masks_copy)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA)
def test_cuda_equals_cpu():
    g = torch.Generator().manual_seed(2)
    scores = torch.round(torch.randn(100_000, generator=g) * 20) / 20
    labels = torch.rand(100_000, generator=g) < 0.1
    for fn in (auroc, aupr, f1_max):
        got = fn(scores.cuda(), labels.cuda())
        assert got.device.type == "cuda"
        assert got.item() == pytest.approx(fn(scores, labels).item(), abs=1e-12)


@pytest.mark.parametrize("fn", [auroc, roc_curve, aupr, precision_recall_curve, f1_max])
def test_errors(fn):
    with pytest.raises(ValueError, match="same shape"):
        fn(torch.rand(4), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="empty"):
        fn(torch.empty(0), torch.empty(0, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        fn(torch.tensor([0.1, float("nan"), 0.3]), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        fn(torch.rand(3), torch.tensor([0, 255, 1]))
    with pytest.raises(ValueError, match="only one class.*both normal"):
        fn(torch.rand(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError):
        fn(torch.rand(3), torch.tensor([0.0, 1.0, 1.0]))


def test_all_anomalous_is_an_error_for_roc_only():
    scores, labels = torch.tensor([0.2, 0.4]), torch.ones(2, dtype=torch.bool)
    with pytest.raises(ValueError, match="only one class.*anomalous"):
        auroc(scores, labels)
    with pytest.raises(ValueError, match="only one class"):
        roc_curve(scores, labels)
    assert aupr(scores, labels).item() == 1.0
    assert f1_max(scores, labels).item() == 1.0
