"""The mask of one view without sampling every class at every pixel, pixel for pixel the mask
`model.upsample.softmax_mask` gives.

A bilinearly sampled logit vector is a convex combination of its corner cells' vectors (at most
four; border padding repeats the edge cells). So:

- where every corner's argmax is class k, the pixel's is k (for j < k each corner has
  l_j < l_k, for j > k l_j <= l_k: the first-index tie rule holds too);
- elsewhere, class j can win only if its best corner reaches L, the best worst corner of any
  class (max over c of min over corners of l_c): for one field only those classes are sampled,
  a handful of the C for a real head.

Both tests keep MARGIN (far above float32 rounding): a corner whose two best classes are closer
does not count as agreeing, and a class is dropped only when its best corner is below L by more.
The pixels left are sampled by grid_sample at the same coordinates, per class, as softmax_mask
samples them, so the masks are equal, ties included. Output rows between the same two logit rows
share one pattern of corner classes: the per-pixel work is one row gather, plus the sampled pixels.
"""

from __future__ import annotations

import torch

from .upsample import Piece, piece_window, sample_logits

MARGIN = 1e-4  # x (1 + the field's largest |logit|); float32 rounding of a bilinear sample is ~1e-7 of it
# Corner cells come from our own float32 copy of grid_sample's source coordinate. A pixel within
# this many cells of a cell centre counts the cells on both sides (three rows or columns must
# agree), so a last-bit difference from grid_sample's own arithmetic cannot pick other corners.
CORNER_TOLERANCE = 1e-3


def argmax_mask(pieces: list[Piece], hw: tuple[int, int], strip_bytes: int, mask: torch.Tensor) -> int:
    """Fill `mask` with the argmax of ONE view's sampled logits (its pieces averaged where they
    overlap). Returns how many pixels had classes sampled."""
    h0, w0 = hw
    c = pieces[0].logits.shape[0]
    dtype = torch.int16 if c < 2**15 else torch.int32  # class ids, and c: "sample this pixel"
    margins = [MARGIN * (1 + float(p.logits.abs().max())) for p in pieces]
    tables = [_corner_table(p.logits, margin) for p, margin in zip(pieces, margins, strict=True)]
    # one field: only the classes that can win between a pixel's corners are sampled (overlapping
    # windows average fields, which this bound does not cover: there every class is)
    candidates = _candidates(pieces[0].logits, margins[0]) if len(pieces) == 1 else None
    rows = max(1, min(h0, strip_bytes // (8 * w0)))  # a few bytes per pixel here, not 12 per class
    sampled = 0
    for r0 in range(0, h0, rows):
        r1 = min(h0, r0 + rows)
        windows = [piece_window(p, hw, r0, r1) for p in pieces]
        blocks, claims, combo_of_row = _strip_claims(tables, windows, r0, r1, w0, c, dtype)
        unsure = claims == c
        mask[r0:r1] = torch.where(unsure, 0, claims).to(mask.dtype)[combo_of_row]
        todo = unsure.any(1).nonzero(as_tuple=True)[0].tolist()
        if not todo:
            continue
        # the rows of one combination share its unsure columns: sample them as one small grid
        sizes = torch.bincount(combo_of_row, minlength=len(claims)).tolist()
        rows_of = (torch.argsort(combo_of_row, stable=True) + r0).split(sizes)
        for m in todo:
            y, x = rows_of[m], unsure[m].nonzero(as_tuple=True)[0]
            classes = None if candidates is None else _group_classes(candidates, blocks[m], windows[0], x)
            k = c if classes is None else len(classes)
            step = max(1, strip_bytes // (4 * max(k, 2) * 3 * len(x)))  # rows sampled at once
            for i in range(0, len(y), step):
                best = _sampled_argmax(pieces, windows, y[i : i + step], x, classes)
                mask[y[i : i + step, None], x[None, :]] = best.to(mask.dtype)
            sampled += len(y) * len(x)
    return sampled


def _strip_claims(tables, windows, r0: int, r1: int, w0: int, c: int, dtype):
    """For rows r0..r1: the distinct combinations of logit-row blocks the pieces put a row in
    (`blocks[m]`: piece 0's block start and three-row flag), each combination's claimed class per
    column (c: sample), and each row's combination."""
    keys, patterns, blocks = [], [], []
    for table, window in zip(tables, windows, strict=True):
        row_key = torch.full((r1 - r0,), -1, dtype=torch.long, device=table[0].device)
        if window is not None:
            ra, rb, ca, cb, gy, gx = window
            ya, y3 = _block_starts(gy, table[0].shape[0])
            distinct, inverse = torch.unique(2 * ya + y3, return_inverse=True)
            row_key[ra - r0 : rb - r0] = inverse
            patterns.append(_corner_classes(table, distinct // 2, distinct % 2 == 1, gx, c, dtype))
            blocks.append(distinct)
        else:
            patterns.append(None)
            blocks.append(None)
        keys.append(row_key)
    combos, combo_of_row = torch.unique(torch.stack(keys, 1), dim=0, return_inverse=True)
    claims = torch.full((len(combos), w0), -1, dtype=dtype, device=combos.device)
    for p, (pattern, window) in enumerate(zip(patterns, windows, strict=True)):
        if window is None:
            continue
        ra, rb, ca, cb = window[:4]
        m = (combos[:, p] >= 0).nonzero(as_tuple=True)[0]
        new, seen = pattern[combos[m, p]], claims[m, ca:cb]
        # overlapping windows that claim the same class keep it; otherwise the pixel is sampled
        claims[m, ca:cb] = torch.where((seen < 0) | (seen == new), new, c)
    first = [(k // 2, k % 2 == 1) for k in blocks[0][combos[:, 0]].tolist()] if len(windows) == 1 else None
    return first, claims, combo_of_row


def _sampled_argmax(pieces, windows, y: torch.Tensor, x: torch.Tensor, classes: torch.Tensor | None):
    """(len(y), len(x)): the argmax over `classes` (None: every class) at original rows y and
    columns x (both ascending), summed and averaged in the same order and arithmetic as
    `view_logits`, so the result is the one it gives."""
    total = count = None
    for p, window in zip(pieces, windows, strict=True):
        if window is None:
            continue
        ra, rb, ca, cb, gy, gx = window
        i0, i1, j0, j1 = 0, len(y), 0, len(x)  # one field covers every pixel
        if len(pieces) > 1:
            i0, i1 = torch.searchsorted(y, torch.tensor([ra, rb], device=y.device)).tolist()
            j0, j1 = torch.searchsorted(x, torch.tensor([ca, cb], device=x.device)).tolist()
            if i0 >= i1 or j0 >= j1:
                continue
        grid = torch.stack(torch.broadcast_tensors(gx[x[j0:j1] - ca][None, :], gy[y[i0:i1] - ra][:, None]), dim=-1)
        sampled = sample_logits(p.logits if classes is None else p.logits[classes], grid)
        if len(pieces) == 1:
            total = sampled  # one field: the sample itself, as view_logits adds it to zeros
            break
        if total is None:
            total = torch.zeros(len(sampled), len(y), len(x), device=y.device)
            count = torch.zeros(1, len(y), len(x), device=y.device)
        total[:, i0:i1, j0:j1] += sampled
        count[:, i0:i1, j0:j1] += 1
    best = (total if count is None else total / count).max(0).indices
    return best if classes is None else classes[best]


def _corner_table(logits: torch.Tensor, margin: float):
    """Per logit cell: its argmax class; whether the 2x2 block of cells starting there agrees on
    it, each by more than `margin` (rows and columns past the edge repeat the last, as border
    padding does); and whether the 3x2 block (three rows) does."""
    cls = logits.max(0).indices
    sure = torch.ones_like(cls, dtype=torch.bool)
    if logits.shape[0] > 1:
        top = logits.topk(2, dim=0).values
        sure = top[0] - top[1] > margin
    cls_sure = torch.where(sure, cls, -1)  # an unsure corner agrees with no one
    padded = _pad_edge(cls_sure)
    corner = padded[:-1, :-1]
    agree = (corner >= 0) & (corner == padded[:-1, 1:]) & (corner == padded[1:, :-1]) & (corner == padded[1:, 1:])
    return cls, agree, agree & torch.cat([agree[1:], agree[-1:]], 0)


def _candidates(logits: torch.Tensor, margin: float) -> torch.Tensor:
    """(C, gh, gw): whether a class can win anywhere in the 2x2 block of cells starting there:
    its best corner is not `margin` below the best worst corner of any class."""
    padded = _pad_edge(logits)
    a, b, c, d = padded[:, :-1, :-1], padded[:, :-1, 1:], padded[:, 1:, :-1], padded[:, 1:, 1:]
    best = torch.maximum(torch.maximum(a, b), torch.maximum(c, d))
    worst = torch.minimum(torch.minimum(a, b), torch.minimum(c, d))
    return best >= worst.max(0).values - margin


def _group_classes(candidates: torch.Tensor, block: tuple[int, bool], window, x: torch.Tensor) -> torch.Tensor:
    """The classes that can win at pixels in columns x of one row block (ascending, so the first
    index still wins a tie): those of every 2x2 block of cells those pixels lie in."""
    gh, gw = candidates.shape[1:]
    ya, three_rows = block
    xa, x3 = _block_starts(window[5][x - window[2]], gw)
    columns = torch.zeros(gw, dtype=torch.bool, device=x.device)
    columns[xa] = True
    columns[(xa + 1).clamp_(max=gw - 1)[x3]] = True
    rows = candidates[:, ya : min(gh, ya + 1 + three_rows)]
    return rows[:, :, columns].flatten(1).any(1).nonzero(as_tuple=True)[0]


def _corner_classes(table, ya, y3, gx: torch.Tensor, c: int, dtype: torch.dtype) -> torch.Tensor:
    """(rows, cols): the class every corner cell of a pixel agrees on, or c where they do not, for
    rows of block start ya (three rows where y3) at coordinates gx. A per-row lookup over the
    grid's columns, then one gather along the columns."""
    cls, agree, agree3 = table
    xa, x3 = _block_starts(gx, cls.shape[1])
    row_agree = torch.where(y3[:, None], agree3[ya], agree[ya])  # (rows, gw): the block's rows agree
    row_cls = cls[ya].to(dtype)
    three_cols = row_agree & torch.cat([row_agree[:, 1:], row_agree[:, -1:]], 1)
    lookup = torch.cat([torch.where(row_agree, row_cls, c), torch.where(three_cols, row_cls, c)], 1)
    return lookup.index_select(1, xa + cls.shape[1] * x3)


def _block_starts(g: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each normalised coordinate's first corner cell, and whether it has three (it lies within
    CORNER_TOLERANCE of a cell centre, where grid_sample's floor may fall either side)."""
    position = ((g + 1) * (size / 2) - 0.5).clamp_(0, size - 1)  # grid_sample's unnormalise, clipped
    low = torch.floor(position - CORNER_TOLERANCE).clamp_(min=0)
    high = torch.floor(position + CORNER_TOLERANCE).clamp_(max=size - 1)
    return low.long(), high > low


def _pad_edge(t: torch.Tensor) -> torch.Tensor:
    """One more row and column at the end, repeating the last (border padding's view)."""
    t = torch.cat([t, t[..., -1:, :]], -2)
    return torch.cat([t, t[..., -1:]], -1)
