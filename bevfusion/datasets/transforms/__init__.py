"""Pipeline transforms under their official `type` names (see bevfusion.datasets.pipeline)."""
