"""Shared I/O, without torch or Ray: atomic writes to any fsspec URL, Parquet parts, run records,
mask and confidence PNGs, COCO and Label Studio RLE."""
