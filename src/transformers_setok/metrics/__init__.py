"""The project's `evaluate` modules, kept in the package and loaded by local path (loading a metric by its Hub
name would fetch it from the Hub, which is often unreachable)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import evaluate

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("answer_accuracy", "referring_iou", "reconstruction_psnr", "scene_checks")


def metric_path(name: str) -> str:
    """The folder `evaluate.load` takes for one of `METRIC_NAMES`."""
    if name not in METRIC_NAMES:
        raise ValueError(f"`name` must be one of {METRIC_NAMES}, got {name!r}")
    return str(METRICS_DIR / name)


def load_metric(name: str, config_name: str | None = None, **kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load` of one of the project's metrics by its local path; `config_name` picks "text_to_image"
    or "editing" for `scene_checks`. `evaluate` is imported here, so importing the package does not pay for it."""
    import evaluate

    return evaluate.load(metric_path(name), config_name, **kwargs)
