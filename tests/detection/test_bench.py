"""`detection.bench`: rows with speedup switches, the choice of precisions, the table's
columns, and the mAP-delta workdir check. (The command itself is tested in test_cli.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.errors import SppnetError
from detection.backbones import build_net
from detection.bench import (BenchRow, auto_variants, bench_variants, format_table, run_bench,
                             variant_map_deltas)
from detection.features import ExtractSettings


@pytest.fixture(scope="module")
def setup():
    net = build_net("zf5_small", seed=0, crop_size=99).eval()
    rng = np.random.default_rng(0)
    images = []
    for k in range(2):
        image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
        xy = rng.uniform(0, 60, (30, 2))
        boxes = np.concatenate([xy, np.minimum(xy + rng.uniform(8, 60, (30, 2)), [119, 89])], 1)
        images.append((f"im{k}", image, boxes.astype(np.float32)))
    return net, images, ExtractSettings(max_side=400)


def test_rows_with_and_without_switches(setup):
    net, images, settings = setup
    rows = [BenchRow("SPP-net 1-scale", "spp", (160,)),
            BenchRow("SPP-net +dedup+svd", "spp", (160,), ("dedup", "svd")),
            BenchRow("R-CNN", "rcnn", (160,))]
    result = run_bench(net, images, rows, settings, torch.device("cpu"), rcnn_sample=10)
    plain, fast, rcnn = (result["rows"][r.name] for r in rows)
    assert plain["conv_gflops_per_s"] > 0 and fast["conv_gflops_per_s"] is None
    assert fast["switches"] == ["dedup", "svd"] and plain["switches"] == []
    assert rcnn["extrapolated_from"] == 10
    for row in (plain, fast, rcnn):
        assert row["total_s"] == pytest.approx(row["conv_s"] + row["pool_s"] + row["fc_s"])


def test_bench_variants_against_the_plain_rcnn(setup):
    net, images, settings = setup
    table = run_bench(net, images, [BenchRow("SPP-net 1-scale", "spp", (160,)),
                                    BenchRow("R-CNN", "rcnn", (160,))],
                      settings, torch.device("cpu"), rcnn_sample=5)["rows"]
    out = bench_variants(net, images, (160,), settings, torch.device("cpu"), table,
                         ["dedup", "svd+channels_last"], fp32_rate=100.0)
    assert set(out["variants"]) == {"dedup", "svd+channels_last"}
    for name, row in out["variants"].items():
        assert row["speedup"] == pytest.approx(table["R-CNN"]["total_s"] / row["total_s"])
        assert row["mAP_delta"] is None and f"SPP-net +{name}" in table
    text = format_table({"rows": table, "variants": {**out["variants"],
                                                     "dedup": {"mAP_delta": -0.004}}})
    assert "mAP delta" in text and "-0.004" in text


def test_precisions_are_tried_only_where_they_are_faster():
    singles, skipped = auto_variants({"fp32": 100.0, "bf16": 800.0, "fp16": 90.0})
    assert "bf16" in singles and "fp16" not in singles
    assert "fp16" in skipped and "90" in skipped["fp16"]
    singles, skipped = auto_variants({"fp32": 100.0, "bf16": 1.0, "fp16": 0.0})
    assert singles == ["dedup", "svd", "channels_last", "batch"]
    assert set(skipped) == {"bf16", "fp16", "int8"}
    singles, skipped = auto_variants({"fp32": 100.0, "bf16": 1.0, "fp16": 0.0}, int8=True)
    assert "int8" in singles and "int8" not in skipped


def test_map_deltas_need_a_demo_workdir(tmp_path):
    with pytest.raises(SppnetError, match="sppnet demo"):
        variant_map_deltas(tmp_path, ["dedup"], torch.device("cpu"))


def test_batched_rows_time_groups_of_images(setup):
    net, images, settings = setup
    three = images + images[:1]
    row = BenchRow("SPP-net +batch", "spp", (160,), ("batch",))
    result = run_bench(net, three, [row], settings, torch.device("cpu"))["rows"][row.name]
    assert result["images_per_batch"] == 4 and result["switches"] == ["batch"]
    assert result["total_s"] == pytest.approx(result["conv_s"] + result["pool_s"] + result["fc_s"])
