"""Contact sheets of `dinoseg discover`: one JPEG per cluster, crops of the images it covers most
around its patches, the cluster tinted with its colour and the rest dimmed, so a person can see
what each cluster is and name it."""

from __future__ import annotations

import colorsys
import io

import numpy as np

from model.errors import DinosegError
from model.geometry import PATCH_SIZE


def cluster_colors(k: int) -> list[tuple[int, int, int]]:
    """k distinct colours: hues spread evenly, two lightness levels alternating."""
    out = []
    for i in range(k):
        r, g, b = colorsys.hls_to_rgb(i / k, 0.5 if i % 2 == 0 else 0.35, 0.85)
        out.append((round(r * 255), round(g * 255), round(b * 255)))
    return out


TILE = 160  # pixels a side of a contact-sheet tile
COLUMNS = 4


def write_contact_sheets(config, out, centres, classes, sheets, so) -> list[str]:
    """One JPEG per cluster: the sheet images it covers most (share of their patches), the
    cluster's patches tinted with its colour and the rest dimmed. Returns their URLs."""
    from PIL import Image

    from pipeline.data.decode import DecodeConfig, decode_image
    from pipeline.data.sources import ReadBytes
    from pipeline.io.files import write_bytes_atomic
    from pipeline.label.accumulate import unit_rows

    if not sheets:
        return []
    # decoded near the pass's resolution (JPEGs by DCT scaling), then resized to its exact grid
    read, decode = ReadBytes(so), DecodeConfig(config.max_megapixels, shrink_to=config.resolution)
    assigned, pictures = [], []
    for _key, path, f, g in sorted(sheets, key=lambda sheet: sheet[0]):  # key order, not Ray's: the same sheets
        c, gh, gw = f.shape
        labels = np.argmax(unit_rows(f.reshape(c, -1).T) @ centres.T, axis=1).reshape(gh, gw)
        data = read({"path": np.asarray([path], dtype=object)})
        if data["error_stage"][0]:
            continue
        try:
            rgb, _, _ = decode_image(data["bytes"][0], decode)
        except DinosegError:
            continue  # changed since the pass: one tile fewer
        rgb = np.asarray(Image.fromarray(rgb).resize((g["resized_w"], g["resized_h"]), Image.Resampling.BILINEAR))
        canvas = np.zeros((gh * PATCH_SIZE, gw * PATCH_SIZE, 3), np.uint8)
        canvas[g["pad_top"] : g["pad_top"] + rgb.shape[0], g["pad_left"] : g["pad_left"] + rgb.shape[1]] = rgb
        assigned.append(labels)
        pictures.append(canvas)
    urls = []
    for i, color in enumerate(classes.colors):
        shares = np.array([(a == i).mean() for a in assigned])
        order = [j for j in np.argsort(-shares, kind="stable") if shares[j] > 0][: config.sheet_tiles]
        tiles = [_tile(pictures[j], assigned[j] == i, color) for j in order]
        rows = max(1, -(-len(tiles) // COLUMNS))
        sheet = np.full((rows * TILE, COLUMNS * TILE, 3), 32, np.uint8)
        for t, tile in enumerate(tiles):
            y, x = divmod(t, COLUMNS)
            sheet[y * TILE : y * TILE + tile.shape[0], x * TILE : x * TILE + tile.shape[1]] = tile
        buf = io.BytesIO()
        Image.fromarray(sheet).save(buf, format="JPEG", quality=85)
        url = f"{out}/clusters/{classes.names[i]}.jpg"
        write_bytes_atomic(url, buf.getvalue(), so)
        urls.append(url)
    return urls


MIN_CROP_CELLS = 6  # a crop shows at least this many patches a side of context


def _tile(picture: np.ndarray, cells: np.ndarray, color) -> np.ndarray:
    """A crop around the cluster's cells (one patch of margin, at least MIN_CROP_CELLS a side),
    the cells tinted and the rest dimmed, fit into TILE x TILE: a small region of a large photo
    stays visible."""
    from PIL import Image

    on = np.kron(cells, np.ones((PATCH_SIZE, PATCH_SIZE), bool))[..., None]
    x = picture.astype(np.float32)
    x = np.where(on, 0.55 * x + 0.45 * np.asarray(color, np.float32), 0.3 * x)
    (y0, y1), (x0, x1) = (_span(np.flatnonzero(cells.any(axis=a)), cells.shape[1 - a]) for a in (1, 0))
    crop = x[y0 * PATCH_SIZE : y1 * PATCH_SIZE, x0 * PATCH_SIZE : x1 * PATCH_SIZE]
    img = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8))
    img.thumbnail((TILE, TILE), Image.Resampling.BILINEAR)
    return np.asarray(img)


def _span(indices: np.ndarray, n: int) -> tuple[int, int]:
    """[start, stop) of the cells `indices` with a margin of one, widened to MIN_CROP_CELLS."""
    if not len(indices):
        return 0, n
    start, stop = max(0, int(indices[0]) - 1), min(n, int(indices[-1]) + 2)
    width = max(stop - start, min(n, MIN_CROP_CELLS))
    start = min(max(0, (start + stop - width) // 2), n - width)  # centred, then moved inside
    return start, start + width
