"""HungarianMatcher: batched == one-by-one, empty targets, known optimum, cost against float64."""
import itertools
import math

import pytest
import torch

from solq.models.matcher import HungarianMatcher


def _random_boxes(n, gen):
    c = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
    return torch.cat([c, wh], 1)


def _outputs(B, Q, C, gen):
    return {"pred_logits": torch.randn(B, Q, C, generator=gen) * 2,
            "pred_boxes": _random_boxes(B * Q, gen).view(B, Q, 4)}


def _targets(sizes, C, gen):
    return [{"labels": torch.randint(0, C, (n,), generator=gen), "boxes": _random_boxes(n, gen),
             "image_id": torch.tensor(i)} for i, n in enumerate(sizes)]


def _cost64(logits, boxes, labels, tboxes, alpha=0.25, gamma=2.0, wc=2.0, wb=5.0, wg=2.0):
    """Naive float64 cost matrix [Q, n] for one image."""
    Q, n = len(logits), len(labels)
    C = torch.zeros(Q, n, dtype=torch.float64)

    def xyxy(b):
        cx, cy, w, h = [float(v) for v in b]
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2

    for q in range(Q):
        for j in range(n):
            p = 1 / (1 + math.exp(-float(logits[q, labels[j]])))
            pos = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
            neg = (1 - alpha) * p ** gamma * -math.log(1 - p + 1e-8)
            l1 = sum(abs(float(a) - float(b)) for a, b in zip(boxes[q], tboxes[j]))
            a, b = xyxy(boxes[q]), xyxy(tboxes[j])
            iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            inter = iw * ih
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            enc = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
            giou = inter / union - (enc - union) / enc
            C[q, j] = wb * l1 + wc * (pos - neg) - wg * giou
    return C


def test_cost_matrix_matches_float64_reference():
    gen = torch.Generator().manual_seed(0)
    out = _outputs(2, 5, 4, gen)
    tgts = _targets([3, 2], 4, gen)
    cost = HungarianMatcher().cost_matrix(out, tgts)
    assert cost.shape == (2, 5, 5)
    for b, col in ((0, slice(0, 3)), (1, slice(3, 5))):
        ref = _cost64(out["pred_logits"][b], out["pred_boxes"][b], tgts[b]["labels"], tgts[b]["boxes"])
        torch.testing.assert_close(cost[b, :, col].double(), ref, rtol=1e-5, atol=1e-5)


def test_batched_equals_one_by_one():
    gen = torch.Generator().manual_seed(1)
    sizes = [3, 0, 7, 1]
    out = _outputs(len(sizes), 9, 6, gen)
    tgts = _targets(sizes, 6, gen)
    matcher = HungarianMatcher()
    batched = matcher(out, tgts)
    for b in range(len(sizes)):
        single = matcher({k: v[b:b + 1] for k, v in out.items()}, [tgts[b]])[0]
        assert torch.equal(batched[b][0], single[0]) and torch.equal(batched[b][1], single[1])
        assert batched[b][0].dtype == torch.int64 and len(batched[b][0]) == sizes[b]
        assert len(set(batched[b][0].tolist())) == sizes[b]  # one-to-one


def test_empty_targets():
    gen = torch.Generator().manual_seed(2)
    out = _outputs(2, 4, 3, gen)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    for q, t in HungarianMatcher()(out, empty):
        assert q.dtype == t.dtype == torch.int64 and q.numel() == t.numel() == 0


def test_optimum_is_the_brute_force_minimum():
    gen = torch.Generator().manual_seed(3)
    out = _outputs(1, 5, 3, gen)
    tgts = _targets([3], 3, gen)
    q, t = HungarianMatcher()(out, tgts)[0]
    ref = _cost64(out["pred_logits"][0], out["pred_boxes"][0], tgts[0]["labels"], tgts[0]["boxes"])
    best = min(sum(ref[p[j], j] for j in range(3)) for p in itertools.permutations(range(5), 3))
    assert float(sum(ref[qi, ti] for qi, ti in zip(q.tolist(), t.tolist()))) == pytest.approx(float(best))


def test_exact_predictions_are_recovered():
    # queries 4, 1, 2 predict the three targets exactly with confident correct classes
    gen = torch.Generator().manual_seed(4)
    out = _outputs(1, 6, 3, gen)
    tgts = _targets([3], 3, gen)
    perm = [4, 1, 2]
    for j, qi in enumerate(perm):
        out["pred_boxes"][0, qi] = tgts[0]["boxes"][j]
        out["pred_logits"][0, qi] = -8.0
        out["pred_logits"][0, qi, tgts[0]["labels"][j]] = 8.0
    q, t = HungarianMatcher()(out, tgts)[0]
    assert dict(zip(t.tolist(), q.tolist())) == dict(enumerate(perm))


def test_bad_labels_are_reported():
    gen = torch.Generator().manual_seed(5)
    out = _outputs(1, 4, 3, gen)
    tgts = [{"labels": torch.tensor([5]), "boxes": _random_boxes(1, gen), "image_id": torch.tensor(42)}]
    with pytest.raises(ValueError, match="42"):
        HungarianMatcher()(out, tgts)
