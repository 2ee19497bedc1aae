"""Per-class NMS and the per-class cap against a slow greedy reference."""

from __future__ import annotations

import torch

from detection.postprocess import detections_from_scores, vote_boxes


def greedy_nms(boxes, scores, iou):
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    kept = []
    for i in order:
        ok = True
        for j in kept:
            b, c = boxes[i], boxes[j]
            iw = min(b[2], c[2]) - max(b[0], c[0]) + 1
            ih = min(b[3], c[3]) - max(b[1], c[1]) + 1
            if iw > 0 and ih > 0:
                inter = iw * ih
                union = (b[2] - b[0] + 1) * (b[3] - b[1] + 1) + (c[2] - c[0] + 1) * (c[3] - c[1] + 1) - inter
                if inter / union > iou:
                    ok = False
                    break
        if ok:
            kept.append(i)
    return kept


def test_matches_greedy_per_class_nms_with_cap():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 10 + torch.rand(300, 2, generator=g) * 80], 1).round()
    scores = torch.randn(300, 3, generator=g)
    out = detections_from_scores(boxes, scores, score_threshold=-0.5, max_per_class=7)
    for k in range(3):
        valid = (scores[:, k] > -0.5).nonzero().flatten().tolist()
        kept = greedy_nms([boxes[i].tolist() for i in valid], scores[valid, k].tolist(), 0.3)[:7]
        expected = sorted(scores[valid, k][kept].tolist(), reverse=True)
        got = out["scores"][out["labels"] == k + 1].tolist()
        assert got == expected
    assert out["boxes"].shape[1] == 4


def test_per_class_boxes():
    boxes = torch.tensor([[[0.0, 0, 10, 10], [5, 5, 50, 50]]])      # [N=1, K=2, 4]
    out = detections_from_scores(boxes, torch.tensor([[1.0, 2.0]]))
    assert out["labels"].tolist() == [2, 1]
    assert out["boxes"].tolist() == [[5, 5, 50, 50], [0, 0, 10, 10]]


def test_box_voting_is_the_score_weighted_mean_of_each_kept_boxes_cluster():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(200, 2, generator=g) * 150
    boxes = torch.cat([xy, xy + 20 + torch.rand(200, 2, generator=g) * 60], 1).round()
    scores = torch.randn(200, 3, generator=g)
    plain = detections_from_scores(boxes, scores, score_threshold=-0.3)
    voted = detections_from_scores(boxes, scores, score_threshold=-0.3, vote_iou=0.5)
    assert torch.equal(plain["scores"], voted["scores"])
    assert torch.equal(plain["labels"], voted["labels"])
    assert not torch.allclose(plain["boxes"], voted["boxes"])
    for box, label, got in zip(plain["boxes"], plain["labels"], voted["boxes"]):
        k = int(label) - 1
        num, den = torch.zeros(4, dtype=torch.float64), 0.0
        for b, sc in zip(boxes.double(), scores[:, k].double()):
            iw = min(b[2], box[2]) - max(b[0], box[0]) + 1
            ih = min(b[3], box[3]) - max(b[1], box[1]) + 1
            if sc <= -0.3 or sc <= 0 or iw <= 0 or ih <= 0:
                continue
            inter = iw * ih
            union = (b[2] - b[0] + 1) * (b[3] - b[1] + 1) + (box[2] - box[0] + 1) * (box[3] - box[1] + 1) - inter
            if inter / union >= 0.5:
                num, den = num + sc * b, den + float(sc)
        expected = num / den if den > 0 else box.double()
        assert torch.allclose(got.double(), expected, atol=1e-3)


def test_box_voting_takes_votes_from_its_own_class_only_and_keeps_unvoted_boxes():
    kept = torch.tensor([[10.0, 10, 50, 50], [100, 100, 140, 140]])
    candidates = torch.tensor([[10.0, 10, 50, 50], [14, 10, 54, 50], [20, 10, 60, 50],
                               [100, 100, 140, 140], [104, 100, 144, 140]])
    scores = torch.tensor([0.6, 0.2, 0.9, -0.5, 0.8])
    classes = torch.tensor([0, 0, 1, 1, 0])
    out = vote_boxes(kept, torch.tensor([0, 1]), candidates, scores, classes, 0.5)
    # class 0: the kept box and its neighbour, 0.6 and 0.2; the class-1 box and the far one do not vote
    assert torch.allclose(out[0], torch.tensor([11.0, 10, 51, 50]))
    # class 1's kept box: its only overlapping class-1 candidate (itself) has a negative score
    assert torch.equal(out[1], kept[1])
