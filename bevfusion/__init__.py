"""Camera + LiDAR bird's-eye-view perception, after MIT HAN Lab's BEVFusion."""

__version__ = "0.1.0"
