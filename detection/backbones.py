"""Backbones: a conv trunk shared by both methods, plus each method's own fc6/fc7 head.

- `zf5`: ZF-5 as in the SPP-net paper (conv1 96x7x7/2, LRN, pool; conv2 256x5x5/2, LRN, pool;
  conv3-5 384/384/256 3x3; stride 16; fc6, fc7 4096). Caffe pools round up: `ceil_mode=True`.
- `zf5_small`: the same topology, about 1/3 of the width, BatchNorm instead of LRN (a documented
  departure, for CPU training from scratch), fc 512.
- `alexnet`, `vgg16`: torchvision's, cut before the last max pool (conv5 / conv5_3 + ReLU);
  fc6 and fc7 taken from their classifiers.

Each trunk owns its preprocessing (ZF-5: BGR minus 128 as the original; torchvision models: their
weights' mean and std), chosen so that the mean pixel maps to zero (the R-CNN warp pads with it).

Heads. `rcnn_fc` reads R-CNN's pool5 (the trunk's own last max pool on a fixed-size warp: 6x6 for
ZF-5 and AlexNet at 227, 7x7 for VGG16 at 224). `spp_fc` reads the spatial pyramid. With
torchvision weights both start from the pretrained fc6/fc7: `spp_fc.fc6` gets the pretrained
weights on the columns of the pyramid level equal to pool5's grid (6 or 7) and zeros elsewhere, so
that at the start it computes exactly what the pretrained network computes on pool5.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from data.errors import SppnetError
from detection import onednn
from detection.spp import SpatialPyramidPool, spp_output_size

BACKBONES = ("zf5", "zf5_small", "alexnet", "vgg16")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """Fixed facts of a backbone: widths, the R-CNN crop and pool5 grid, default SPP levels."""

    name: str
    channels: int            # conv5 channels
    fc_hidden: int           # fc6/fc7 width
    crop_size: int           # R-CNN warp size (default)
    pool5_grid: int          # R-CNN pool5 grid at that size, the size pretrained fc6 expects
    spp_levels: tuple[int, ...]
    rcnn_chunk: int          # warped regions per conv batch (bounds memory)


SPECS = {
    "zf5": BackboneSpec("zf5", 256, 4096, 227, 6, (1, 2, 3, 6), 128),
    "zf5_small": BackboneSpec("zf5_small", 96, 512, 227, 6, (1, 2, 3, 6), 128),
    "alexnet": BackboneSpec("alexnet", 256, 4096, 227, 6, (1, 2, 3, 6), 128),
    "vgg16": BackboneSpec("vgg16", 512, 4096, 224, 7, (1, 2, 3, 7), 16),
}


class CrossChannelLRN(nn.Module):
    """Local response normalisation across channels, as Caffe's and `nn.LocalResponseNorm`
    (`x / (k + alpha / size * sum of x^2 over `size` neighbouring channels)^beta`), computed with
    shifted adds instead of a 3-D average pool: the same numbers, several times faster on a CPU.
    Without autograd it works on blocks of rows small enough to stay in the CPU's cache (each
    temporary of a whole map would be a fresh, page-faulting allocation)."""

    block_elements = 1 << 16

    def __init__(self, size: int = 3, alpha: float = 5e-5, beta: float = 0.75, k: float = 1.0):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x: Tensor) -> Tensor:
        if (torch.is_grad_enabled() and x.requires_grad) or x.dim() != 4 or x.device.type != "cpu":
            return self._normalise(x)
        out = torch.empty_like(x)
        n, c, h, w = x.shape
        if c * h * w <= self.block_elements:      # small maps (R-CNN's warps): whole images
            images = self.block_elements // max(1, c * h * w)
            for i in range(0, n, images):
                out[i:i + images] = self._normalise(x[i:i + images])
            return out
        rows = max(1, self.block_elements // max(1, c * w))
        for i in range(n):
            for r in range(0, h, rows):
                out[i:i + 1, :, r:r + rows] = self._normalise(x[i:i + 1, :, r:r + rows])
        return out

    def _normalise(self, x: Tensor) -> Tensor:
        squares = x * x
        total = squares.clone()
        before, after = self.size // 2, (self.size - 1) // 2
        for shift in range(1, before + 1):          # channels c - shift
            total[:, shift:] += squares[:, :-shift]
        for shift in range(1, after + 1):           # channels c + shift
            total[:, :-shift] += squares[:, shift:]
        scale = total.mul_(self.alpha / self.size).add_(self.k)
        if self.beta == 0.75:                       # the usual case: two square roots, no pow
            inv = scale.rsqrt_()
            return x * inv * inv.sqrt()
        return x * scale.pow_(-self.beta)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


def _zf5_trunk(widths: Sequence[int], batch_norm: bool) -> tuple[nn.Sequential, nn.Module]:
    """ZF-5 conv1-conv5 (+ReLU) and its pool5; LRN(3) or BatchNorm after conv1 and conv2."""
    c1, c2, c3, c4, c5 = widths

    def norm(c: int) -> nn.Module:
        return nn.BatchNorm2d(c) if batch_norm else CrossChannelLRN(3, alpha=5e-5, beta=0.75)

    def conv(cin: int, cout: int, k: int, s: int, p: int) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=not batch_norm)

    layers: list[nn.Module] = [conv(3, c1, 7, 2, 1), nn.ReLU(inplace=True)]
    if batch_norm:
        layers = [conv(3, c1, 7, 2, 1), norm(c1), nn.ReLU(inplace=True)]
    else:
        layers.append(norm(c1))
    layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
    if batch_norm:
        layers += [conv(c1, c2, 5, 2, 0), norm(c2), nn.ReLU(inplace=True)]
    else:
        layers += [conv(c1, c2, 5, 2, 0), nn.ReLU(inplace=True), norm(c2)]
    layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
    for cin, cout in ((c2, c3), (c3, c4), (c4, c5)):
        layers += [conv(cin, cout, 3, 1, 1)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers), nn.MaxPool2d(3, 2, ceil_mode=True)


def output_side(layers: nn.Module, side: int) -> int:
    """Spatial size after `layers` for an input of `side` pixels (convs and max pools; pools
    with `ceil_mode` as Caffe: the last window must start inside the input)."""
    for layer in layers.modules():
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
            k, s, p = (v[0] if isinstance(v, tuple) else v
                       for v in (layer.kernel_size, layer.stride, layer.padding))
            span = side + 2 * p - k
            out = (-(-span // s) if getattr(layer, "ceil_mode", False) else span // s) + 1
            if getattr(layer, "ceil_mode", False) and (out - 1) * s >= side + p:
                out -= 1
            side = out
    return side


def trunk_geometry(trunk: nn.Module) -> tuple[int, float]:
    """Total stride and the 0-based pixel centre of output cell 0's receptive field, from the
    trunk's convolutions and pools (`centre += ((k - 1) / 2 - pad) * jump; jump *= stride`)."""
    jump, centre = 1, 0.0
    for layer in trunk.modules():
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
            k, s, p = (layer.kernel_size, layer.stride, layer.padding)
            k, s, p = (v[0] if isinstance(v, tuple) else v for v in (k, s, p))
            centre += ((k - 1) / 2 - p) * jump
            jump *= s
    return jump, centre


class FCHead(nn.Module):
    """fc6 -> ReLU -> Dropout -> fc7 -> ReLU -> Dropout: `[N, in_features] -> [N, hidden]`."""

    def __init__(self, in_features: int, hidden: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        # in inference on the CPU the products go through oneDNN (`detection.onednn`)
        x = self.dropout(torch.relu(onednn.linear(self.fc6, x)))
        return self.dropout(torch.relu(onednn.linear(self.fc7, x)))


class DetectorNet(nn.Module):
    """The shared trunk with R-CNN's pool5 + fc head and SPP-net's pyramid + fc head."""

    def __init__(self, name: str, spp_levels: Sequence[int] | None = None,
                 crop_size: int | None = None) -> None:
        super().__init__()
        if name not in SPECS:
            raise SppnetError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
        self.spec = SPECS[name]
        self.name = name
        self.spp_levels = tuple(spp_levels or self.spec.spp_levels)
        self.crop_size = int(crop_size or self.spec.crop_size)
        self.trunk, self.pool5 = _make_trunk(name)
        self.stride, self.first_centre = trunk_geometry(self.trunk)
        self.pool5_grid = output_side(self.pool5, output_side(self.trunk, self.crop_size))
        if self.pool5_grid < 1:
            raise SppnetError(f"crop size {self.crop_size} is too small for {name}")
        c, g = self.spec.channels, self.pool5_grid
        self.spp = SpatialPyramidPool(self.spp_levels)
        self.spp_fc = FCHead(spp_output_size(c, self.spp_levels), self.spec.fc_hidden)
        self.rcnn_fc = FCHead(c * g * g, self.spec.fc_hidden)
        if name in ("zf5", "zf5_small"):
            self.register_buffer("pixel_mean", torch.full((3, 1, 1), 128.0), persistent=False)
            self.register_buffer("pixel_scale", torch.ones(3, 1, 1), persistent=False)
            self.bgr = True
        else:
            self.register_buffer("pixel_mean", 255 * torch.tensor(IMAGENET_MEAN).view(3, 1, 1),
                                 persistent=False)
            self.register_buffer("pixel_scale", 1 / (255 * torch.tensor(IMAGENET_STD)).view(3, 1, 1),
                                 persistent=False)
            self.bgr = False

    @property
    def feature_dim(self) -> int:
        """Width of the fc7 features both methods produce."""
        return self.spec.fc_hidden

    def preprocess(self, image: np.ndarray | Tensor) -> Tensor:
        """HxWx3 uint8 RGB (array or tensor) -> `[1, 3, H, W]` float on this net's device,
        normalised so that the mean pixel is zero."""
        t = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image)
        t = t.to(self.pixel_mean.device).permute(2, 0, 1).float()
        if self.bgr:
            t = t.flip(0)
        return ((t - self.pixel_mean) * self.pixel_scale).unsqueeze(0).contiguous()


def _make_trunk(name: str) -> tuple[nn.Module, nn.Module]:
    if name == "zf5":
        return _zf5_trunk((96, 256, 384, 384, 256), batch_norm=False)
    if name == "zf5_small":
        return _zf5_trunk((32, 96, 128, 128, 96), batch_norm=True)
    from torchvision import models

    if name == "alexnet":
        features = models.alexnet(weights=None).features
        return features[:12], features[12]
    features = models.vgg16(weights=None).features
    return features[:30], features[30]


def _torchvision_state_to_net(net: DetectorNet, state: dict[str, Tensor]) -> None:
    """Load a torchvision AlexNet/VGG16 state dict: features -> trunk, classifier fc6/fc7 -> both
    heads (SPP's fc6 on its pool5-sized level, zeros elsewhere)."""
    fc_index = {"alexnet": (1, 4), "vgg16": (0, 3)}[net.name]
    trunk_state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    missing = net.trunk.load_state_dict(
        {k: v for k, v in trunk_state.items() if int(k.split(".")[0]) < len(net.trunk)},
        strict=True)
    del missing
    fc6_w, fc6_b = state[f"classifier.{fc_index[0]}.weight"], state[f"classifier.{fc_index[0]}.bias"]
    fc7_w, fc7_b = state[f"classifier.{fc_index[1]}.weight"], state[f"classifier.{fc_index[1]}.bias"]
    with torch.no_grad():
        for head in (net.rcnn_fc, net.spp_fc):
            head.fc7.weight.copy_(fc7_w)
            head.fc7.bias.copy_(fc7_b)
            head.fc6.bias.copy_(fc6_b)
        grid = net.spec.pool5_grid
        if net.pool5_grid != grid:
            raise SppnetError(f"pretrained {net.name} fc6 needs a {grid}x{grid} pool5, which crop "
                              f"size {net.spec.crop_size} gives, not {net.crop_size}")
        net.rcnn_fc.fc6.weight.copy_(fc6_w)
        net.spp_fc.fc6.weight.zero_()
        if grid in net.spp_levels:
            c = net.spec.channels
            start = c * sum(n * n for n in net.spp_levels[: net.spp_levels.index(grid)])
            net.spp_fc.fc6.weight[:, start:start + c * grid * grid].copy_(fc6_w)


def _imagenet_state(name: str) -> dict[str, Tensor]:
    """torchvision's ImageNet weights (downloaded once into torch's cache); offline is a one-line
    error that says where to put the file."""
    from torchvision import models

    weights = {"alexnet": models.AlexNet_Weights.IMAGENET1K_V1,
               "vgg16": models.VGG16_Weights.IMAGENET1K_V1}[name]
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # URLError, OSError, hash mismatch...
        raise SppnetError(
            f"cannot load ImageNet weights for {name} from {weights.url} "
            f"({type(exc).__name__}: {exc}); on a machine without internet, download that file "
            f"elsewhere and pass --weights PATH, or put it in {torch.hub.get_dir()}/checkpoints/"
        ) from None


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint without unpickling arbitrary objects (`weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise SppnetError(f"{path}: weights file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:200]
        raise SppnetError(f"{path}: not a readable weights file ({type(exc).__name__}: "
                          f"{reason})") from None


def prefer_channels_last(net: DetectorNet) -> DetectorNet:
    """On a CPU, keep the trunk's weights channels-last, so that its convolutions and pools run
    in NHWC whatever the input's layout (measured on this project's 2-core CPU, small preset:
    a training step 1.1-1.5x and R-CNN inference 1.5-2x faster). The values are the same; other
    devices are left as they are. `sppnet bench` keeps the plain layout for its plain rows."""
    if next(net.parameters()).device.type == "cpu":
        net.trunk.to(memory_format=torch.channels_last)
    return net


def save_checkpoint(net: DetectorNet, path: str | Path, extra: dict | None = None) -> Path:
    """Write the net as tensors plus a JSON-compatible config (atomically)."""
    from data.atomic import atomic_write

    config = {"backbone": net.name, "spp_levels": list(net.spp_levels),
              "crop_size": net.crop_size, **(extra or {})}
    payload = {"config": config, "state_dict": net.state_dict()}
    return atomic_write(path, lambda f: torch.save(payload, f))


def build_net(name: str, weights: str | Path | None = None,
              spp_levels: Sequence[int] | None = None, seed: int | None = 0,
              crop_size: int | None = None) -> DetectorNet:
    """A DetectorNet with `weights`: None/"random" (seeded init), "imagenet" (torchvision,
    alexnet/vgg16), or a file: a checkpoint saved by `save_checkpoint` (its config wins over
    `spp_levels` and `crop_size`) or a torchvision AlexNet/VGG16 state dict."""
    if seed is not None:
        torch.manual_seed(seed)
    data = None
    if weights not in (None, "random", "imagenet"):
        data = load_checkpoint(weights)
        if isinstance(data, dict) and isinstance(data.get("config"), dict):
            spp_levels = data["config"].get("spp_levels", spp_levels)
            crop_size = data["config"].get("crop_size", crop_size)
    net = DetectorNet(name, spp_levels, crop_size)
    if weights in (None, "random"):
        return net.eval()
    if weights == "imagenet":
        if name not in ("alexnet", "vgg16"):
            raise SppnetError(f"--weights imagenet needs alexnet or vgg16 (torchvision has no "
                              f"ImageNet {name}); {name} starts from random weights or a file")
        _torchvision_state_to_net(net, _imagenet_state(name))
        return net.eval()
    if isinstance(data, dict) and "state_dict" in data and "config" in data:
        if data["config"].get("backbone") != name:
            raise SppnetError(f"{weights}: checkpoint is for backbone "
                              f"{data['config'].get('backbone')!r}, not {name!r}")
        try:
            net.load_state_dict(data["state_dict"])
        except RuntimeError as exc:
            raise SppnetError(f"{weights}: weights do not fit {name}: "
                              f"{' '.join(str(exc).split())[:300]}") from None
        return net.eval()
    if isinstance(data, dict) and any(k.startswith("features.") for k in data):
        if name not in ("alexnet", "vgg16"):
            raise SppnetError(f"{weights}: a torchvision state dict fits alexnet or vgg16, "
                              f"not {name}")
        try:
            _torchvision_state_to_net(net, data)
        except (KeyError, RuntimeError) as exc:
            raise SppnetError(f"{weights}: not a torchvision {name} state dict: "
                              f"{' '.join(str(exc).split())[:300]}") from None
        return net.eval()
    raise SppnetError(f"{weights}: neither an sppnet checkpoint nor a torchvision state dict")
