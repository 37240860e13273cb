"""Rerun recordings of drives: LiDAR, the six cameras, GT and predicted boxes and BEV maps, the ego path.

    from bevfusion.visualization import visualize_drive
    visualize_drive(dataset, results="results.pkl", out="drive.rrd")

`frames` gathers each sample as numpy (no rerun), `recording` logs frames and builds the blueprint,
`drive` ties them to a dataset, a results file or a checkpoint. rerun is imported only when a
recording is made, never by `import bevfusion`.
"""
from __future__ import annotations

__all__ = ["visualize_drive", "predict_samples", "load_results", "load_frame", "FrameOptions", "LogOptions",
           "write_rrd", "make_blueprint"]


def __getattr__(name: str):
    if name in ("visualize_drive", "predict_samples"):
        from bevfusion.visualization import drive
        return getattr(drive, name)
    if name in ("load_results", "load_frame", "FrameOptions"):
        from bevfusion.visualization import frames
        return getattr(frames, name)
    if name in ("LogOptions", "write_rrd", "make_blueprint"):
        from bevfusion.visualization import recording
        return getattr(recording, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
