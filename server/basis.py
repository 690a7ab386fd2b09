"""The fleet's basis for mixture personalization: K diverse adapters from what devices learned.

The server remembers each device's latest adapter (the round's global adapter plus that device's
update), clusters them with k-means (k-means++ seeding, Arthur & Vassilvitskii 2007) and offers
the K centroids. Inference-only devices mix them (``edge_sdk.tuners.mix``) and report their
coefficients; the mean of those becomes the prior the next basis starts devices from.
"""

from __future__ import annotations

import numpy as np

from fleetune.edge_sdk.errors import ConfigError


def kmeans(
    points: np.ndarray, k: int, seed: int = 0, iters: int = 25, restarts: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Centroids [k, d] and the cluster of each point; ``k`` is capped at the number of points
    (then every point is its own centroid). ``restarts`` k-means++ starts, the one with the
    least squared distance to its centroids kept (Lloyd's iterations stop at a local optimum:
    with a few points, one start may group an outlier with the wrong cluster)."""
    if points.ndim != 2 or len(points) == 0:
        raise ConfigError(f"k-means needs a non-empty [n, d] array, got {points.shape}")
    if k < 1 or restarts < 1:
        raise ConfigError(f"k-means needs k >= 1 and restarts >= 1, got {k} and {restarts}")
    points = points.astype(np.float32)
    if k >= len(points):
        return points.copy(), np.arange(len(points))
    rng = np.random.default_rng(seed)
    runs = [_lloyd(points, _seeds(points, k, rng), iters) for _ in range(restarts)]
    return min(runs, key=lambda run: _inertia(points, *run))


def span(points: np.ndarray) -> np.ndarray:
    """The n points' coordinates in the space they span ([n, min(n, d)], by QR): every distance
    and mean is kept, so k-means over them groups the points exactly as over the originals,
    at a cost that no longer grows with d (an adapter has ~10^5-10^6 numbers, a fleet tens of
    devices)."""
    _, r = np.linalg.qr(points.T)
    return np.ascontiguousarray(r.T)


def _seeds(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++: far points are likelier seeds."""
    n = len(points)
    centroids = [points[rng.integers(n)]]
    for _ in range(1, k):
        dist = np.min([((points - c) ** 2).sum(axis=1) for c in centroids], axis=0)
        total = float(dist.sum())
        pick = rng.integers(n) if total == 0 else rng.choice(n, p=dist / total)
        centroids.append(points[pick])
    return np.stack(centroids)


def _lloyd(points: np.ndarray, centers: np.ndarray, iters: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.zeros(len(points), dtype=np.int64)
    for i in range(iters):
        # |p - c|^2 = |p|^2 - 2 p.c + |c|^2, without an [n, k, d] temporary
        dist = (centers**2).sum(axis=1)[None, :] - 2.0 * points @ centers.T
        new = dist.argmin(axis=1)
        if i > 0 and np.array_equal(new, labels):
            break
        labels = new
        for j in range(len(centers)):
            if np.any(labels == j):
                centers[j] = points[labels == j].mean(axis=0)
    return centers, labels


def _inertia(points: np.ndarray, centers: np.ndarray, labels: np.ndarray) -> float:
    return float(((points - centers[labels]) ** 2).sum())
