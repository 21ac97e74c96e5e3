"""What the backbone's input looks like, free of torch (pipeline tasks import it without paying
for torch): DINOv2's patch size and ImageNet normalisation, the short-side resize, the centre
padding to whole patches, and mmseg's sliding-window origins."""

from __future__ import annotations

PATCH_SIZE = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resized_size(h: int, w: int, short: int, long_max: float) -> tuple[int, int]:
    """Keep the aspect ratio; short side -> `short` unless the long side would pass `long_max`."""
    scale = min(short / min(h, w), long_max / max(h, w))
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def centre_pad(h: int, w: int, multiple: int = PATCH_SIZE) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding that centres h x w in the next multiple of `multiple`."""
    ph, pw = (-h) % multiple, (-w) % multiple
    return ph // 2, ph - ph // 2, pw // 2, pw - pw // 2


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """mmseg's sliding-window origins: a grid of `stride`, the last window flush with the edge."""
    if size <= crop:
        return [0]
    n = (size - crop + stride - 1) // stride + 1
    return sorted({min(i * stride, size - crop) for i in range(n)})
