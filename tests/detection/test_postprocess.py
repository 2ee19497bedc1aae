"""Per-class NMS and the per-class cap against a slow greedy reference."""

from __future__ import annotations

import torch

from detection.postprocess import clip_boxes, detections_from_scores


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


def test_per_class_boxes_and_clip():
    boxes = torch.tensor([[[0.0, 0, 10, 10], [5, 5, 50, 50]]])      # [N=1, K=2, 4]
    out = detections_from_scores(boxes, torch.tensor([[1.0, 2.0]]))
    assert out["labels"].tolist() == [2, 1]
    assert out["boxes"].tolist() == [[5, 5, 50, 50], [0, 0, 10, 10]]
    assert clip_boxes(torch.tensor([[-3.0, 2, 700, 90]]), 640, 80).tolist() == [[0, 2, 639, 79]]
