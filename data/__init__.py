"""Datasets as code: the VOC reader, the demo dataset generator, image loading, result files."""
