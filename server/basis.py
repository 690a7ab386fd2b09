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
    points: np.ndarray, k: int, seed: int = 0, iters: int = 25
) -> tuple[np.ndarray, np.ndarray]:
    """Centroids [k, d] and the cluster of each point; ``k`` is capped at the number of points
    (then every point is its own centroid)."""
    if points.ndim != 2 or len(points) == 0:
        raise ConfigError(f"k-means needs a non-empty [n, d] array, got {points.shape}")
    if k < 1:
        raise ConfigError(f"k-means needs k >= 1, got {k}")
    points = points.astype(np.float32)
    n = len(points)
    if k >= n:
        return points.copy(), np.arange(n)
    rng = np.random.default_rng(seed)
    centroids = [points[rng.integers(n)]]
    for _ in range(1, k):  # k-means++: far points are likelier seeds
        dist = np.min([((points - c) ** 2).sum(axis=1) for c in centroids], axis=0)
        total = float(dist.sum())
        pick = rng.integers(n) if total == 0 else rng.choice(n, p=dist / total)
        centroids.append(points[pick])
    centers = np.stack(centroids)
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        # |p - c|^2 = |p|^2 - 2 p.c + |c|^2, without an [n, k, d] temporary
        dist = (centers**2).sum(axis=1)[None, :] - 2.0 * points @ centers.T
        new = dist.argmin(axis=1)
        if _ > 0 and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            if np.any(labels == j):
                centers[j] = points[labels == j].mean(axis=0)
    return centers, labels
