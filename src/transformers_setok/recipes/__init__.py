"""Training recipes (the paper's three stages as YAML configs on the stock `Trainer`) and their evaluation."""

from .evaluation import EVALUATED_TASKS, RenderSettings, TaskResult, evaluate_world, spearman, summary
from .recipe import RECIPES_DIR, STAGES, StageConfig, stage_config_path, stage_dir, train_stage
from .world_data import (
    SetokPretrainingCollator,
    caption_request,
    chat_examples,
    draw_request,
    edit_request,
    segment_request,
    task_examples,
    world_texts,
)

__all__ = [
    "EVALUATED_TASKS",
    "RECIPES_DIR",
    "STAGES",
    "RenderSettings",
    "SetokPretrainingCollator",
    "StageConfig",
    "TaskResult",
    "caption_request",
    "chat_examples",
    "draw_request",
    "edit_request",
    "evaluate_world",
    "segment_request",
    "spearman",
    "stage_config_path",
    "stage_dir",
    "summary",
    "task_examples",
    "train_stage",
    "world_texts",
]
