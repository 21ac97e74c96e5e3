"""The maths of building prototypes, free of torch and Ray: labels to per-patch class weights,
the per-class accumulator (the weighted mean of unit features, and a bounded seeded sample of
them), and weighted k-means (scikit-learn: seeded and deterministic, wheels for every platform).
"""

from __future__ import annotations

import hashlib

import numpy as np

from model.classes import IGNORE_INDEX
from model.geometry import PATCH_SIZE


def patch_weights(label: np.ndarray, geometry: dict, num_classes: int) -> np.ndarray:
    """(num_classes, grid_h, grid_w): the share of each patch that each class labels.

    `label` is the mask at the image's size; `geometry` the cache row's resized size, padding and
    grid. A pixel belongs to the patch its centre lands in after the resize and padding, so
    labels are counted at their own resolution (no nearest-neighbour resize loses a click)."""
    h, w = label.shape
    rh, rw, gh, gw = (int(geometry[k]) for k in ("resized_h", "resized_w", "grid_h", "grid_w"))
    top, left = int(geometry["pad_top"]), int(geometry["pad_left"])
    ys, xs = np.nonzero(label != IGNORE_INDEX)
    cls = label[ys, xs].astype(np.int64)
    keep = cls < num_classes
    ys, xs, cls = ys[keep], xs[keep], cls[keep]
    py = np.clip(((ys + 0.5) * rh / h + top) // PATCH_SIZE, 0, gh - 1).astype(np.int64)
    px = np.clip(((xs + 0.5) * rw / w + left) // PATCH_SIZE, 0, gw - 1).astype(np.int64)
    counts = np.bincount((cls * gh + py) * gw + px, minlength=num_classes * gh * gw)
    area = (PATCH_SIZE * h / rh) * (PATCH_SIZE * w / rw)  # original pixels per patch
    return (counts.reshape(num_classes, gh, gw) / area).astype(np.float32)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (float32), as the head's F.normalize does (eps 1e-12): features,
    samples and centroids are all compared by cosine."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class ClassAccumulator:
    """Per class: the weighted sum of its patches' unit features (the k=1 prototype), and a
    seeded uniform sample of at most `max_patches` of them with their weights (for k-means).
    Memory is bounded by classes x max_patches whatever the number of images. A patch's place
    in the sample depends on the seed, its image and its cell only, never on the order images
    arrive in (Ray returns them in any order), so a seed gives the same prototypes."""

    def __init__(self, num_classes: int, dim: int, max_patches: int, seed: int, keep_samples: bool):
        self.sums = np.zeros((num_classes, dim), np.float64)
        self.weight = np.zeros(num_classes, np.float64)
        self.patches = np.zeros(num_classes, np.int64)
        self.images = np.zeros(num_classes, np.int64)
        self.max_patches, self.keep, self.seed = max_patches, keep_samples, seed
        # per class: chunks of (unit features fp16, weights, random priorities), cut back to the
        # max_patches lowest priorities (a uniform sample) whenever they pass twice that
        self.samples: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in range(num_classes)]
        self.held = np.zeros(num_classes, np.int64)

    def add(self, features: np.ndarray, weights: np.ndarray, image: str = "") -> None:
        """features (D, gh, gw) of one image; weights (C, gh, gw) from `patch_weights`; `image`
        names it (its URL) for the sample's seeded priorities."""
        priorities = None
        if self.keep:
            digest = int(hashlib.sha256(f"{self.seed}:{image}".encode()).hexdigest()[:15], 16)
            priorities = np.random.default_rng(digest).random(weights.shape[1] * weights.shape[2])
        f = unit_rows(features.reshape(features.shape[0], -1).T)
        w = weights.reshape(weights.shape[0], -1)
        for c in np.flatnonzero(w.any(axis=1)):
            rows = np.flatnonzero(w[c])
            self.sums[c] += w[c, rows] @ f[rows]
            self.weight[c] += w[c, rows].sum()
            self.patches[c] += len(rows)
            self.images[c] += 1
            if self.keep:
                self.samples[c].append((f[rows].astype(np.float16), w[c, rows], priorities[rows]))
                self.held[c] += len(rows)
                if self.held[c] > 2 * self.max_patches:
                    self._cut(c)

    def _cut(self, c: int) -> None:
        x, wt, pri = (np.concatenate(parts) for parts in zip(*self.samples[c], strict=True))
        if len(pri) > self.max_patches:  # bottom-k of random priorities: a uniform sample
            top = np.argpartition(pri, self.max_patches)[: self.max_patches]
            x, wt, pri = x[top], wt[top], pri[top]
        order = np.argsort(pri, kind="stable")  # k-means++ seeds by row order: make it the seed's
        self.samples[c], self.held[c] = [(x[order], wt[order], pri[order])], len(pri)

    def sample(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Class c's sampled unit features (float32) and their weights."""
        if not self.samples[c]:
            return np.zeros((0, self.sums.shape[1]), np.float32), np.zeros(0, np.float32)
        self._cut(c)
        x, wt, _ = self.samples[c][0]
        return x.astype(np.float32), wt

    def prototypes(self, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(C, k, D) unit prototypes and (C, k) validity: k-means centroids, the mean for k=1."""
        c, d = self.sums.shape
        protos, valid = np.zeros((c, k, d), np.float32), np.zeros((c, k), bool)
        for i in range(c):
            if self.weight[i] <= 0:
                continue
            if k == 1:
                centres = self.sums[i][None]
            else:
                x, wt = self.sample(i)
                centres = kmeans(x, min(k, len(x)), seed, wt)
            centres = unit_rows(centres)
            protos[i, : len(centres)], valid[i, : len(centres)] = centres, True
        return protos, valid


def kmeans(x: np.ndarray, k: int, seed: int, sample_weight: np.ndarray | None = None) -> np.ndarray:
    """Centroids of k-means on unit vectors (scikit-learn's Lloyd, k-means++ init, seeded)."""
    from sklearn.cluster import KMeans

    k = max(1, min(k, len(np.unique(x, axis=0))))
    # one k-means++ start: a seeded start is reproducible, and three cost 3x for no gain measured
    return KMeans(n_clusters=k, n_init=1, random_state=seed).fit(x, sample_weight=sample_weight).cluster_centers_
