"""promptvault: compressed on-disk prompt caches for MLX / mlx-lm."""

__version__ = "0.1.0"
