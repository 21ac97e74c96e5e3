"""Segmenter: a frozen DINOv2 backbone and a head, from uint8 RGB images to masks.

Per image: normalise on the device, resize (short side `resolution`, long side capped as in Meta's
eval), then for every test-time view (scales x flips) compute a logit field, either whole-image
(centre-padded to a multiple of 14) or by sliding window (crops accumulated at view resolution).
The fields are sampled bilinearly straight at the original image's pixels, strip by strip so a
large image needs bounded memory, and the class is the argmax of the mean softmax over views
(model.upsample; without TTA and confidence, only where the corner cells disagree). The mask is
never resized after the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .argmax import argmax_mask
from .backbone import IMAGENET_MEAN, IMAGENET_STD, DinoVisionTransformer
from .classes import ClassMap
from .device import autocast, choose_device, choose_precision
from .errors import DinosegError, ImageInputError
from .geometry import centre_pad, resized_size, window_starts
from .upsample import Piece, softmax_mask

META_MS_SCALES = (1.0, 1.32, 1.73, 2.28, 3.0)  # Meta's multi-scale test ratios
CONFIDENCE_CHOICES = (True, "mean", False)  # predict(confidence=...): the map (and its mean), the mean, none


@dataclass(frozen=True)
class InferenceConfig:
    resolution: int | None = (
        512  # short side after resizing (Meta's eval: 512 for linear, 640 for ms); None: the head's
    )
    long_side_ratio: float = 4.0  # long side capped at ratio x resolution (Meta: 2048 for 512)
    mode: str = "whole"  # 'whole' or 'slide'
    crop: int = 512  # sliding window, Meta's 512 / 341
    stride: int = 341
    flip: bool = False  # add horizontally flipped views
    scales: tuple[float, ...] = (1.0,)  # multiples of `resolution`; META_MS_SCALES for Meta's 'ms'
    precision: str = "auto"  # fp32 | bf16 | fp16 | auto
    batch_size: int = 8  # images or crops per backbone forward
    strip_bytes: int = 64 << 20  # logits memory for one strip of the output upsampling
    antialias: bool = True  # when shrinking the input: large photos alias badly without it

    def validate(self) -> "InferenceConfig":
        if self.mode not in ("whole", "slide"):
            raise DinosegError(f"Unknown mode '{self.mode}': use whole or slide.")
        if (self.resolution is not None and self.resolution < 14) or not 14 <= self.stride <= self.crop:
            raise DinosegError(
                f"resolution {self.resolution}, crop {self.crop}, stride {self.stride} are out of range: "
                "use resolution >= 14 and 14 <= stride <= crop."
            )
        if not self.scales or any(s <= 0 for s in self.scales):
            raise DinosegError(f"scales {self.scales} must be positive numbers, e.g. 1.0,1.32,1.73.")
        if self.batch_size < 1:
            raise DinosegError(f"batch size {self.batch_size} must be at least 1.")
        return self


@dataclass
class Prediction:
    mask: np.ndarray  # (H, W) uint8 (uint16 past 256 classes): class index per pixel
    # (H, W) float32: max softmax probability (mean over TTA views); None unless asked for
    confidence: np.ndarray | None = None
    mean_confidence: float | None = None  # the confidence map's mean, reduced on the device; None unless asked for
    class_counts: np.ndarray | None = None  # (C,) int64 pixels per class; None unless asked for


class Segmenter(nn.Module):
    def __init__(
        self,
        backbone: DinoVisionTransformer,
        head: nn.Module,
        classes: ClassMap,
        config: InferenceConfig | None = None,
        device: str | torch.device | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        model_id: str = "",
        head_checksum: str = "",
    ):
        super().__init__()
        self.model_id = model_id  # what produced the masks, for the rows a pipeline writes
        self.head_checksum = head_checksum
        config = (config or InferenceConfig()).validate()
        self.config = config if config.resolution is not None else replace(config, resolution=512)
        self.device = choose_device(device)
        self.precision = choose_precision(self.config.precision, self.device)
        if len(classes) != head.config.num_classes:
            raise DinosegError(
                f"the head predicts {head.config.num_classes} classes but the class map has {len(classes)}: pass the matching class map."
            )
        self.classes = classes
        self.backbone = backbone.requires_grad_(False).eval()
        self.head = head.requires_grad_(False).eval()
        self.layers = list(head.config.layers)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255, persistent=False)
        self.to(self.device)

    def with_config(self, **changes) -> "Segmenter":
        """The same weights with other inference options (the modules are shared, not copied)."""
        mean, std = (self.mean / 255).flatten().tolist(), (self.std / 255).flatten().tolist()
        config = replace(self.config, **changes)
        return Segmenter(
            self.backbone, self.head, self.classes, config, self.device, mean, std, self.model_id, self.head_checksum
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # ---- the network -------------------------------------------------------------------------

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Normalised (B, 3, H, W), H and W multiples of 14 -> the head's input maps; for a head
        that reads tokens (dino.txt's), (maps, CLS, registers) per block."""
        tokens = getattr(self.head, "reads_tokens", False)
        return self.backbone.get_intermediate_layers(
            x, n=self.layers, reshape=True, norm=True, return_class_token=tokens, return_register_tokens=tokens
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised, padded (B, 3, H, W) -> float32 logits on the head's grid."""
        with autocast(self.device, self.precision):
            return self.head(self.features(x)).float()

    def _run(self, batch: list[torch.Tensor]) -> list[torch.Tensor]:
        """Forward a list of same-shaped (3, H, W) inputs in chunks of batch_size."""
        out: list[torch.Tensor] = []
        for i in range(0, len(batch), self.config.batch_size):
            out.extend(self(torch.stack(batch[i : i + self.config.batch_size])).unbind(0))
        return out

    # ---- images in, masks out ----------------------------------------------------------------

    @torch.inference_mode()
    def predict(
        self,
        images: Sequence[np.ndarray | torch.Tensor],
        output_sizes: Sequence[tuple[int, int]] | None = None,
        confidence: bool | str = True,
        class_counts: bool = False,
    ) -> list[Prediction]:
        """uint8 RGB images (H, W, 3), any sizes -> one Prediction each, at the input's size.

        `output_sizes` gives each mask's (H, W) when an image arrives already shrunk (e.g. by
        the decode step of a pipeline): views and masks are then laid out for that size.
        `confidence`: True, the per-pixel map and its mean; "mean", only the mean (the map stays
        on the device); False, neither: without TTA the mask then samples every class only at
        the pixels where the surrounding logit cells disagree (the same mask, much less work).
        `class_counts`: also count each class's pixels (on the device, before the copy back).
        """
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3:
            raise ImageInputError("predict() takes a list of images: wrap a single image as [image].")
        if confidence not in CONFIDENCE_CHOICES:
            raise DinosegError(f"confidence={confidence!r}: pass True (the map), 'mean' (its mean only) or False.")
        confidence = "mean" if confidence == "mean" else bool(confidence)
        if output_sizes is not None and len(output_sizes) != len(images):
            raise ImageInputError(
                f"{len(output_sizes)} output sizes for {len(images)} images: give one (H, W) per image."
            )
        sizes, pieces = [], []
        groups: dict[tuple[int, int], list[tuple[Piece, torch.Tensor]]] = {}
        for i, image in enumerate(images):
            x = self._to_tensor(image, i)
            hw = tuple(int(n) for n in output_sizes[i]) if output_sizes is not None else tuple(x.shape[-2:])
            sizes.append(hw)
            for piece, tensor in self._pieces(i, x, hw):
                pieces.append(piece)
                groups.setdefault(tuple(tensor.shape[-2:]), []).append((piece, tensor))
        for group in groups.values():  # same-shaped inputs batch together, across images and views
            for (piece, _), logits in zip(group, self._run([t for _, t in group]), strict=True):
                piece.logits = logits.flip(-1) if piece.flipped else logits
        return [
            self._finish(hw, [p for p in pieces if p.image == i], confidence, class_counts)
            for i, hw in enumerate(sizes)
        ]

    def _to_tensor(self, image, index: int) -> torch.Tensor:
        if isinstance(image, np.ndarray):
            ok = image.dtype == np.uint8
        elif isinstance(image, torch.Tensor):
            ok = image.dtype == torch.uint8
        else:
            raise ImageInputError(
                f"image {index} is a {type(image).__name__}: pass uint8 RGB arrays of shape (H, W, 3)."
            )
        if not ok or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise ImageInputError(
                f"image {index} has dtype {image.dtype} and shape {tuple(image.shape)}: pass uint8 RGB arrays of shape (H, W, 3)."
            )
        if isinstance(image, np.ndarray):  # decoded images may be read-only views (PIL, Ray's zero-copy)
            image = image if image.flags.c_contiguous and image.flags.writeable else np.array(image)
        t = torch.as_tensor(image)
        t = t.to(self.device, non_blocking=True).float().permute(2, 0, 1)  # float first: 10x faster on CPU
        return (t - self.mean) / self.std

    def _pieces(self, index: int, x: torch.Tensor, out_hw: tuple[int, int]):
        """Yield (piece, padded input) for every TTA view of one image and every window of a view.
        View sizes follow the output size, so a pre-shrunk image gives the same views."""
        cfg = self.config
        h0, w0 = out_hw
        views = [(s, f) for s in cfg.scales for f in ((False, True) if cfg.flip else (False,))]
        for v, (scale, flipped) in enumerate(views):
            short = round(cfg.resolution * scale)
            h, w = resized_size(h0, w0, short, cfg.long_side_ratio * short)
            view = x
            if (h, w) != tuple(x.shape[-2:]):
                shrink = cfg.antialias and (h < x.shape[-2] or w < x.shape[-1])
                view = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)[0]
            if flipped:
                view = view.flip(-1)
            if cfg.mode == "whole":
                windows = [(0, 0, h, w)]
            else:
                windows = [
                    (y, xs, min(cfg.crop, h), min(cfg.crop, w))
                    for y in window_starts(h, cfg.crop, cfg.stride)
                    for xs in window_starts(w, cfg.crop, cfg.stride)
                ]
            for y, xs, ch, cw in windows:
                top, bottom, left, right = centre_pad(ch, cw)
                crop = F.pad(view[:, y : y + ch, xs : xs + cw], (left, right, top, bottom))
                # logits of a flipped view are flipped back: the window then starts at w - xs - cw,
                # and the padding before it is the right-hand padding
                x0, before = (w - xs - cw, right) if flipped else (xs, left)
                yield (
                    Piece(index, v, (h, w), (y, x0, ch, cw), (top - y, before - x0), flipped, tuple(crop.shape[-2:])),
                    crop,
                )

    def _finish(self, hw: tuple[int, int], pieces: list[Piece], confidence, class_counts: bool) -> Prediction:
        views = [[p for p in pieces if p.view == v] for v in sorted({p.view for p in pieces})]
        c = self.num_classes
        mask = torch.empty(hw, dtype=torch.uint8 if c <= 256 else torch.int32, device=self.device)
        conf = torch.empty(hw, dtype=torch.float32, device=self.device) if confidence else None
        if conf is None and len(views) == 1:
            argmax_mask(views[0], hw, self.config.strip_bytes, mask)  # the same mask, mostly from corner cells
        else:  # every class at every pixel: the confidence needs them, and TTA averages probabilities
            softmax_mask(views, hw, self.config.strip_bytes, mask, conf)
        # counted before the copy back: only C numbers cross, and torch.bincount beats np.bincount
        # on the CPU too (benchmarks/bench_upsample.py)
        counts = torch.bincount(mask.flatten(), minlength=c).cpu().numpy() if class_counts else None
        host = mask.cpu().numpy().astype(np.uint8 if c <= 256 else np.uint16, copy=False)
        return Prediction(
            host,
            conf.cpu().numpy() if confidence is True else None,
            float(conf.mean(dtype=torch.float64)) if conf is not None else None,  # reduced where the map is
            counts,
        )


__all__ = [
    "InferenceConfig",
    "META_MS_SCALES",
    "Prediction",
    "Segmenter",
    "centre_pad",
    "resized_size",
    "window_starts",
]
