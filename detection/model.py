"""A trained detector: the net, its method, the class list, the scorer (SVMs or the fine-tuned
softmax fc8), box regressors, and how features are computed. Saved as tensors plus a JSON-able
config and loaded with `torch.load(weights_only=True)`: nothing is unpickled."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from data.atomic import atomic_write
from data.errors import SppnetError
from detection.backbones import DetectorNet, load_checkpoint, prefer_channels_last
from detection.boxes import clip_boxes, mirror_boxes, scale_boxes
from detection.features import ConvMaps, ExtractSettings, extract, extract_batch, spp_from_maps
from detection.postprocess import VOTE_IOU, detections_from_scores
from detection.presets import Preset
from detection.scales import box_target_side, fit_input
from detection.timing import StageTimer

MODEL_FORMAT = "sppnet-detector-1"


def describe_inputs(summary: dict) -> str:
    """One phrase for a summary's `scales` / `warp_px`: '96+128 px' or 'regions warped to 99 px'."""
    if summary.get("warp_px"):
        return f"regions warped to {summary['warp_px']} px"
    return f"{'+'.join(map(str, summary.get('scales', [])))} px"


def box_target(preset: Preset) -> float:
    """Multi-scale SPP-net pools each box at the scale where it is closest to the trunk's
    training input: 224 px for the paper's ZF-5 (crop 227), the same fraction of the crop for
    other presets (the small trunk is pre-trained on crops of up to 99 px)."""
    return box_target_side(preset.crop_size)


@dataclass
class Detector:
    """Everything test time needs; `detect` gives torchvision-style outputs.

    `test_mirror` (on by default, a departure from both papers, which score one pass): each
    image is also run flipped left to right, and each box's class scores and regressed boxes
    are the mean of the two passes. Both methods fine-tune on flipped images too, so the two
    passes are two views the net was trained for; on validation images no trunk saw the mean
    lifted SPP-net by 0.033 mAP and R-CNN by 0.009 (README, "Mirrored test pass"), for twice
    the test-time work.

    `box_voting` (on by default, also beyond both papers): after NMS each kept box moves to the
    score-weighted mean of its class's candidates overlapping it at IoU >= 0.5
    (`postprocess.vote_boxes`); scores and the set of detections stay as NMS left them. On
    validation images no trunk saw it lifted both methods by 0.011 mAP and COCO's AP by 0.08
    (SPP-net) and 0.03 (R-CNN) in the mean (README, "Box voting")."""

    net: DetectorNet
    method: str
    classes: tuple[str, ...]
    preset: Preset
    scales: tuple[int, ...]
    fc8: nn.Linear
    svm: object | None = None          # svm.LinearSVMDetector
    box_regressor: object | None = None  # detection.bbox_regression.BoxRegressor
    scorer: str = "svm"
    info: dict = field(default_factory=dict)
    speedups: dict = field(default_factory=dict)   # ExtractSettings fields set by a speedup
    test_mirror: bool = True
    box_voting: bool = True

    @property
    def inputs(self) -> dict:
        """What the windows' features are read from, for summaries: SPP-net's image `scales`,
        or R-CNN's `warp_px` with no scales (it warps every region from the original image)."""
        passes = {"test_mirror": self.test_mirror, "box_voting": self.box_voting}
        if self.method == "spp":
            return {"scales": list(self.scales), **passes}
        return {"scales": [], "warp_px": self.net.crop_size, **passes}

    @property
    def conv_fine_tuned(self) -> bool:
        """Whether fine-tuning trained the conv layers: R-CNN's always (but for its
        `--freeze-conv` ablation), SPP-net's only with `--finetune-conv`, beyond its paper."""
        trained_with = self.info.get("train_settings") or {}
        if self.method == "spp":
            return bool(trained_with.get("spp_finetune_conv", False))
        return not trained_with.get("rcnn_freeze_conv", False)

    @property
    def settings(self) -> ExtractSettings:
        """Feature settings of this detector."""
        return ExtractSettings(scales=self.scales, max_side=self.preset.max_side,
                               box_target=box_target(self.preset), **self.speedups)

    def scores(self, fc7: Tensor) -> Tensor:
        """Class scores `[N, K]`: SVM margins, or softmax probabilities of fc8 without the
        background column."""
        if self.scorer == "svm" and self.svm is not None:
            return torch.as_tensor(self.svm.decision_function(fc7.cpu().numpy()))
        with torch.inference_mode():
            return torch.softmax(self.fc8(fc7), dim=1)[:, 1:].cpu()

    def _fit(self, image: np.ndarray, proposals: np.ndarray | Tensor
             ) -> tuple[np.ndarray, Tensor, tuple[float, float]]:
        """The image shrunk to the preset's largest input as training held it (`fit_input`),
        its proposals in that frame, and the factors that took it there."""
        image, scale = fit_input(image, *self.preset.largest_input())
        return image, scale_boxes(_as_boxes(proposals), *scale), scale

    def detect(self, image: np.ndarray, proposals: np.ndarray | Tensor,
               score_threshold: float | None = None, timer: StageTimer | None = None) -> dict:
        """Detections of one HxWx3 uint8 image from its proposals: per-class NMS at 0.3, at
        most 100 per class; boxes regressed when a regressor is present; averaged with the
        mirror image's pass when `test_mirror` is on. A photo beyond the preset's largest input
        is read shrunk to it, as training read it; the boxes come back in its own pixels."""
        image, boxes, scale = self._fit(image, proposals)
        return in_photo_pixels(self._detect_fitted(image, boxes, score_threshold, timer), scale)

    def _detect_fitted(self, image: np.ndarray, boxes: Tensor, score_threshold: float | None,
                       timer: StageTimer | None) -> dict:
        """`detect` of an image already fitted, with its boxes in that frame."""
        if len(boxes) == 0:
            return _no_detections()
        features = extract(self.net, image, boxes, self.method, self.settings, timer,
                           return_pooled=True)
        mirrored = None
        if self.test_mirror:
            flipped = _mirror_of(boxes, image)
            mirrored = (flipped, *extract(self.net, _mirror_image(image), flipped, self.method,
                                          self.settings, timer, return_pooled=True))
        return self._detections(image, boxes, features, mirrored, score_threshold)

    def detect_many(self, images: list[np.ndarray], proposals: list,
                    score_threshold: float | None = None) -> list[dict]:
        """`detect` of several images; SPP-net runs their conv layers together when its
        settings batch images (the `batch` speedup), mirror images included."""
        if self.method != "spp" or self.settings.batch_images <= 1:
            return [self.detect(image, p, score_threshold) for image, p in zip(images, proposals)]
        if not images:
            return []
        images, boxes, scales = map(list, zip(*(self._fit(image, p)
                                                 for image, p in zip(images, proposals))))
        views, view_boxes = list(images), list(boxes)
        if self.test_mirror:
            views += [_mirror_image(image) for image in images]
            view_boxes += [_mirror_of(b, image) for b, image in zip(boxes, images)]
        features = extract_batch(self.net, views, view_boxes, self.settings, return_pooled=True)
        mirrored = ([(flipped, *pair) for flipped, pair in
                     zip(view_boxes[len(images):], features[len(images):])]
                    if self.test_mirror else [None] * len(images))
        return [in_photo_pixels(self._detections(image, b, own, mirror, score_threshold),
                                scale) if len(b) else _no_detections()
                for image, b, own, mirror, scale in zip(images, boxes, features, mirrored, scales)]

    def detect_from_maps(self, image: np.ndarray, proposals: np.ndarray | Tensor,
                         conv: ConvMaps, score_threshold: float | None = None,
                         mirrored_conv: ConvMaps | None = None) -> dict:
        """SPP-net's `detect` on conv5 maps of `image` computed earlier at this detector's
        scales (`conv_maps`): detectors that differ only in their scales share one conv pass
        (the test-scale choice on validation images), each getting what `detect` gives. With
        `test_mirror` on, `mirrored_conv` holds the maps of the mirror image."""
        if self.method != "spp":
            raise ValueError("detect_from_maps is SPP-net's: R-CNN has no image-level maps")
        if self.test_mirror and mirrored_conv is None:
            raise ValueError("test_mirror needs the mirror image's maps (mirrored_conv)")
        boxes = _as_boxes(proposals)
        if len(boxes) == 0:
            return _no_detections()
        features = spp_from_maps(self.net, conv, boxes, self.settings, return_pooled=True)
        mirrored = None
        if self.test_mirror:
            flipped = _mirror_of(boxes, image)
            mirrored = (flipped, *spp_from_maps(self.net, mirrored_conv, flipped, self.settings,
                                                return_pooled=True))
        return self._detections(image, boxes, features, mirrored, score_threshold)

    def _detections(self, image: np.ndarray, boxes: Tensor, features: tuple[Tensor, Tensor],
                    mirrored: tuple[Tensor, Tensor, Tensor] | None,
                    score_threshold: float | None) -> dict:
        """Scores and boxes from one pass's `(pooled, fc7)`, or the mean of two when the
        mirror image's pass `(mirrored boxes, pooled, fc7)` is given, then per-class NMS (and
        box voting when it is on)."""
        height, width = image.shape[:2]
        pooled, fc7 = features
        scores = self.scores(fc7)
        per_class = boxes
        if self.box_regressor is not None:
            per_class = self.box_regressor.predict(pooled.cpu(), boxes)
        if mirrored is not None:
            flipped, mirror_pooled, mirror_fc7 = mirrored
            scores = (scores + self.scores(mirror_fc7)) / 2
            if self.box_regressor is not None:
                from_mirror = self.box_regressor.predict(mirror_pooled.cpu(), flipped)
                per_class = (per_class + mirror_boxes(from_mirror, width)) / 2
        if self.box_regressor is not None:
            per_class = clip_boxes(per_class, width, height)
        floor = -float("inf") if self.scorer == "svm" else 1e-3     # eval's candidates
        if score_threshold is None:
            score_threshold = floor
        if not self.box_voting:
            return detections_from_scores(per_class, scores, score_threshold)
        # votes come from eval's candidates whatever the cut, so that a detection's box does
        # not depend on the threshold (NMS and the cap keep the same boxes above it either way)
        det = detections_from_scores(per_class, scores, min(floor, score_threshold),
                                     vote_iou=VOTE_IOU)
        if score_threshold > floor:
            keep = det["scores"] > score_threshold
            det = {key: value[keep] for key, value in det.items()}
        return det

    def save(self, path: str | Path) -> Path:
        """Write the detector (atomically)."""
        config = {"format": MODEL_FORMAT, "method": self.method, "classes": list(self.classes),
                  "preset": asdict(self.preset), "scales": list(self.scales),
                  "scorer": self.scorer, "backbone": self.net.name,
                  "spp_levels": list(self.net.spp_levels), "crop_size": self.net.crop_size,
                  "info": json.dumps(self.info)}
        payload = {"config": config, "state_dict": self.net.state_dict(),
                   "fc8": self.fc8.state_dict()}
        if self.svm is not None:
            state = self.svm.to_state()
            payload["svm"] = {k: torch.as_tensor(np.asarray(v)) for k, v in state.items()
                              if k != "config"}
            payload["svm_config"] = json.dumps(state["config"])
        if self.box_regressor is not None:
            payload["box_regressor"] = self.box_regressor.to_state()
        return atomic_write(path, lambda f: torch.save(payload, f))


def _as_boxes(proposals: np.ndarray | Tensor) -> Tensor:
    return torch.as_tensor(np.asarray(proposals), dtype=torch.float32).reshape(-1, 4)


def _mirror_image(image: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """The HxWx3 image flipped left to right."""
    if isinstance(image, Tensor):
        return image.flip(1)
    return np.ascontiguousarray(image[:, ::-1])


def _mirror_of(boxes: Tensor, image: np.ndarray | Tensor) -> Tensor:
    """`boxes` of `image` as they lie in its mirror image."""
    return mirror_boxes(boxes, image.shape[1])


def in_photo_pixels(det: dict, scale: tuple[float, float]) -> dict:
    """Detections of a photo read shrunk by `scale` (across, down; `fit_input`) with their
    boxes in the photo's own pixels."""
    det["boxes"] = scale_boxes(det["boxes"], 1 / scale[0], 1 / scale[1])
    return det


def _no_detections() -> dict:
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
            "scores": torch.zeros(0)}


def load_detector(path: str | Path, device: torch.device | str = "cpu") -> Detector:
    """Read a detector written by `Detector.save`; a wrong file is a one-line error."""
    data = load_checkpoint(path)
    config = data.get("config") if isinstance(data, dict) else None
    if not isinstance(config, dict) or config.get("format") != MODEL_FORMAT:
        raise SppnetError(f"{path}: not an sppnet detector (train one with `sppnet train`)")
    net = DetectorNet(config["backbone"], config["spp_levels"], config["crop_size"])
    net.load_state_dict(data["state_dict"])
    net = prefer_channels_last(net.to(device).eval())
    classes = tuple(config["classes"])
    fc8 = nn.Linear(net.feature_dim, len(classes) + 1)
    fc8.load_state_dict(data["fc8"])
    svm = box_regressor = None
    if "svm" in data:
        from svm import LinearSVMDetector

        svm = LinearSVMDetector.from_state({**data["svm"], "config": data["svm_config"]})
    if "box_regressor" in data:
        from detection.bbox_regression import BoxRegressor

        box_regressor = BoxRegressor.from_state(data["box_regressor"])
    return Detector(net, config["method"], classes, Preset(**{
        k: tuple(v) if isinstance(v, list) else v for k, v in config["preset"].items()}),
        tuple(config["scales"]), fc8.to(device).eval(), svm, box_regressor, config["scorer"],
        json.loads(config.get("info") or "{}"))
