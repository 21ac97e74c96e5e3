"""From logit fields to the original image's pixels: the bilinear sampling behind every mask.

A view's logits (one field, or one per sliding window) are sampled bilinearly (grid_sample,
align_corners=False, border padding) straight at the original pixels, strip by strip so a large
image needs bounded memory.

`softmax_mask` samples every class at every pixel: the mask is the argmax of the mean softmax
over views, the confidence its max (mean over views). `model.argmax.argmax_mask` gives the same
mask for one view while sampling classes only where they can matter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Piece:
    """One network input (the whole view, or a sliding-window crop) and its logits.

    The piece covers view pixels [y0, y0+h) x [x0, x0+w) (in the unflipped view). Per axis, a
    view position c (pixel edges at integers) lies at logit-grid position (c + offset) / cell.
    """

    image: int
    view: int  # index of the TTA view within its image
    view_hw: tuple[int, int]
    region: tuple[int, int, int, int]  # y0, x0, h, w
    offset: tuple[float, float]
    flipped: bool
    padded_hw: tuple[int, int]  # the network input's size (the region plus its centre padding)
    logits: torch.Tensor | None = None  # (C, gh, gw) float32, flipped back for flipped views


def softmax_mask(
    views: list[list[Piece]], hw: tuple[int, int], strip_bytes: int, mask: torch.Tensor, confidence: torch.Tensor | None
) -> None:
    """Fill `mask` (and `confidence`, when given: the max probability) at size `hw` from every
    class sampled at every pixel: the argmax of the mean softmax over views."""
    h0, w0 = hw
    c = views[0][0].logits.shape[0]
    rows = max(1, min(h0, strip_bytes // (4 * max(c, 2) * w0 * 3)))
    for r0 in range(0, h0, rows):
        r1 = min(h0, r0 + rows)
        if len(views) == 1:
            logits = view_logits(views[0], hw, r0, r1)
            best, cls = logits.max(0)
            if confidence is not None:
                confidence[r0:r1] = torch.exp(best - torch.logsumexp(logits, 0))
        else:
            prob = None
            for pieces in views:
                p = view_logits(pieces, hw, r0, r1).softmax(0)
                prob = p if prob is None else prob.add_(p)
            best, cls = prob.max(0)
            if confidence is not None:
                confidence[r0:r1] = best / len(views)
        mask[r0:r1] = cls.to(mask.dtype)


def view_logits(pieces: list[Piece], hw: tuple[int, int], r0: int, r1: int) -> torch.Tensor:
    """Logits of one view at original rows r0..r1: each piece sampled bilinearly at the original
    pixels whose centres fall inside it; overlapping windows are averaged (as mmseg does)."""
    device = pieces[0].logits.device
    total = torch.zeros(pieces[0].logits.shape[0], r1 - r0, hw[1], device=device)
    count = torch.zeros(1, r1 - r0, hw[1], device=device) if len(pieces) > 1 else None
    for p in pieces:
        window = piece_window(p, hw, r0, r1)
        if window is None:
            continue
        ra, rb, ca, cb, gy, gx = window
        grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)
        total[:, ra - r0 : rb - r0, ca:cb] += sample_logits(p.logits, grid)
        if count is not None:
            count[:, ra - r0 : rb - r0, ca:cb] += 1
    return total if count is None else total / count


def sample_logits(logits: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(C, gh, gw) logits at grid (h, w, 2) of normalised (x, y) -> (C, h, w)."""
    return F.grid_sample(logits[None], grid[None], mode="bilinear", padding_mode="border", align_corners=False)[0]


def piece_window(p: Piece, hw: tuple[int, int], r0: int, r1: int):
    """The original pixels rows ra..rb, cols ca..cb (within r0..r1) whose centres fall inside
    the piece, and their grid_sample coordinates; None if there are none."""
    h0, w0 = hw
    (h, w), (y0, x0, ch, cw) = p.view_hw, p.region
    ra, rb = max(r0, _first_inside(y0, h, h0)), min(r1, _first_inside(y0 + ch, h, h0))
    ca, cb = _first_inside(x0, w, w0), _first_inside(x0 + cw, w, w0)
    if ra >= rb or ca >= cb:
        return None
    gh, gw = p.logits.shape[-2:]
    cell_y, cell_x = p.padded_hw[0] / gh, p.padded_hw[1] / gw  # view pixels per logit cell
    device = p.logits.device
    gy = _grid_coords(ra, rb, h / h0, p.offset[0], cell_y, gh, device)
    gx = _grid_coords(ca, cb, w / w0, p.offset[1], cell_x, gw, device)
    return ra, rb, ca, cb, gy, gx


def _first_inside(edge: float, view_n: int, n0: int) -> int:
    """The first original pixel whose centre maps at or past view position `edge`.

    Neighbouring windows share an edge, so every pixel lands in at least one window."""
    return max(0, min(n0, math.ceil(edge * n0 / view_n - 0.5)))


def _grid_coords(start: int, stop: int, scale: float, offset: float, cell: float, size: int, device) -> torch.Tensor:
    """grid_sample's normalised coordinates (align_corners=False) of original pixels start..stop."""
    centres = (torch.arange(start, stop, device=device, dtype=torch.float32) + 0.5) * scale
    return 2.0 * ((centres + offset) / cell) / size - 1.0
