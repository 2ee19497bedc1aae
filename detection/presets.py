"""Named settings for a whole run: `paper` (the SPP-net paper's protocol) and `small` (a narrow
ZF-5 on small images with fewer proposals, sized for a CPU). A preset is a frozen dataclass that
is passed along, never a global."""

from __future__ import annotations

from dataclasses import dataclass, replace

from data.errors import SppnetError
from detection.scales import DEFAULT_MAX_SIDE, PAPER_SCALES, SINGLE_SCALE


@dataclass(frozen=True)
class Preset:
    """Backbone, image scales, proposals and R-CNN crop of a run."""

    name: str
    backbone: str
    scale: int                        # SPP-net single-scale shorter side
    multi_scales: tuple[int, ...]     # SPP-net multi-scale shorter sides
    max_side: int                     # cap on the longer side at any scale
    max_proposals: int                # selective-search boxes per image
    crop_size: int                    # R-CNN warp size
    scorer: str = "svm"               # "svm" (the papers) or "softmax" (the fine-tuned fc8)

    def scales(self, multi: bool = False) -> tuple[int, ...]:
        """The SPP-net scales of a run: one, or the multi-scale set."""
        return self.multi_scales if multi else (self.scale,)

    def largest_input(self) -> tuple[int, int]:
        """The largest image any stage takes, as (shorter side, cap on the longer side): the
        largest SPP-net scale. Photos beyond it are shrunk to it once, in training and at test
        alike (`fit_input`), so both see the same pixels and memory follows the net's inputs."""
        return max((self.scale, *self.multi_scales)), self.max_side

    def with_changes(self, **changes: object) -> "Preset":
        """A copy with some fields replaced."""
        return replace(self, **changes)


PRESETS = {
    "paper": Preset("paper", "zf5", SINGLE_SCALE, PAPER_SCALES, DEFAULT_MAX_SIDE, 2000, 227),
    # small: the softmax of fine-tuning scores better than SVMs here (demo set, seed 0: SPP-net
    # 0.41 vs 0.31 mAP, R-CNN 0.48 vs 0.46), so it is the default; `--scorer svm` trains SVMs.
    # Its multi-scale set brings every box from a tenth of a 180-400 px image's shorter side to
    # the whole image within 1.25x of the 98 px side the trunk learned (`assign_scales`);
    # 224..480 left small and big objects far from it (demo, H200, one trunk per seed: SPP-net
    # 0.586 mAP over 3 seeds with 224..480, 0.655 with 7 scales 128..640, R-CNN 0.695; these
    # 8 scales 0.748 on seed 0, as R-CNN).
    "small": Preset("small", "zf5_small", 320, (96, 128, 176, 240, 320, 448, 640, 800), 1600,
                    500, 99, "softmax"),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; an unknown name is a one-line error."""
    try:
        return PRESETS[name]
    except KeyError:
        raise SppnetError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
