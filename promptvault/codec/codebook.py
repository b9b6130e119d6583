"""Lloyd–Max codebooks for one coordinate of a uniformly random unit vector.

After a random rotation, every coordinate of a unit vector in R^d follows the same marginal,
with density proportional to (1 - t^2)^((d-3)/2) on [-1, 1]. The MSE-optimal scalar quantizer
for that density (Lloyd–Max) is the codebook TurboQuant uses. We solve it numerically on the
exact density for every dimension (small block dims such as 8 are far from Gaussian), in float64
numpy with a fixed grid and a fixed iteration count, so the result is deterministic and any reader
of an old shard can rebuild the same codebook.
"""

from functools import lru_cache

import numpy as np

_GRID_POINTS = 1 << 17
_ITERATIONS = 400


def _density_grid(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Grid points and normalised probability masses of one coordinate of a point on S^{dim-1}."""
    # The mass lies within a few multiples of 1/sqrt(dim) of zero; a tighter interval gives the
    # grid more resolution where it matters. 12 standard deviations leave < 1e-30 outside.
    half_width = min(1.0, 12.0 / np.sqrt(dim))
    edges = np.linspace(-half_width, half_width, _GRID_POINTS + 1)
    points = 0.5 * (edges[1:] + edges[:-1])
    log_density = 0.5 * (dim - 3) * np.log1p(-points * points)
    mass = np.exp(log_density - log_density.max())
    return points, mass / mass.sum()


def _lloyd_max(dim: int, bits: int) -> np.ndarray:
    levels = 1 << bits
    if dim == 1:
        # A 1-dim "unit vector" is ±1: two point masses; spread the levels evenly across them.
        return np.linspace(-1.0, 1.0, levels)
    points, mass = _density_grid(dim)
    cum_mass = np.concatenate([[0.0], np.cumsum(mass)])
    cum_moment = np.concatenate([[0.0], np.cumsum(mass * points)])
    # Start from the quantiles' midpoints: already close to optimal, so the fixed number of
    # iterations converges for every (dim, bits).
    quantiles = (np.arange(levels) + 0.5) / levels
    centroids = np.interp(quantiles, cum_mass[1:], points)
    for _ in range(_ITERATIONS):
        boundaries = 0.5 * (centroids[1:] + centroids[:-1])
        cut = np.concatenate([[0], np.searchsorted(points, boundaries), [len(points)]])
        cell_mass = cum_mass[cut[1:]] - cum_mass[cut[:-1]]
        cell_moment = cum_moment[cut[1:]] - cum_moment[cut[:-1]]
        occupied = cell_mass > 0
        centroids = np.where(occupied, cell_moment / np.where(occupied, cell_mass, 1.0), centroids)
    # Enforce exact symmetry (the density is even) so codes do not depend on rounding noise.
    centroids = 0.5 * (centroids - centroids[::-1])
    return centroids


@lru_cache(maxsize=None)
def codebook(dim: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, boundaries) as float32 arrays for coordinates of a unit vector in R^dim.

    centroids: 2**bits sorted values; boundaries: the 2**bits - 1 midpoints between them.
    """
    if dim < 1:
        raise ValueError(f"codebook dimension must be >= 1, got {dim}")
    if not 1 <= bits <= 8:
        raise ValueError(f"codebook bits must be in 1..8, got {bits}")
    centroids = _lloyd_max(dim, bits).astype(np.float32)
    boundaries = (0.5 * (centroids[1:] + centroids[:-1])).astype(np.float32)
    centroids.setflags(write=False)
    boundaries.setflags(write=False)
    return centroids, boundaries


@lru_cache(maxsize=None)
def distortion(dim: int, bits: int) -> float:
    """Expected ‖u − û‖² for a uniformly random unit vector u in R^dim (the Lloyd–Max MSE).

    This is the theory figure benchmarks and tests compare measured relative MSE against.
    """
    centroids, boundaries = codebook(dim, bits)
    if dim == 1:
        return float(np.mean((np.array([-1.0, 1.0]) - centroids[np.searchsorted(boundaries, [-1.0, 1.0])]) ** 2))
    points, mass = _density_grid(dim)
    nearest = centroids[np.searchsorted(boundaries, points)]
    return float(dim * np.sum(mass * (points - nearest) ** 2))
