"""SPP-net and R-CNN detection: boxes, backbones, SPP, evaluation, timing, the CLI."""
