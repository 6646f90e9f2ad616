"""tanbr_ray: task-aware expert merging (Tanbr) for online MoE inference at the edge."""

__version__ = "0.1.0"
