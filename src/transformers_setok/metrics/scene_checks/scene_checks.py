"""Checks of generated and edited shapes-world images by the rule-based scene reader.

Two configurations:

- `text_to_image`: `predictions` are generated images, `references` their prompts ("two red circles and a
  blue square"); the score is the fraction of images that show every object their prompt names
  (`transformers_setok.scene_reader.shows_prompt`).
- `editing`: `sources` are the images before the edit, `predictions` the edited images, `references` the
  instructions ("make the red circle blue"); the score is the fraction of edits that changed what was asked
  and kept the rest (`transformers_setok.scene_reader.edit_applied`).
"""

import datasets
import evaluate

from transformers_setok.scene_reader import edit_applied, shows_prompt

CONFIGS = ("text_to_image", "editing")


class SceneChecks(evaluate.Metric):
    def _info(self):
        if self.config_name not in CONFIGS:
            raise ValueError(f"`config_name` must be one of {CONFIGS}, got {self.config_name!r}")
        features = {"predictions": datasets.Image(), "references": datasets.Value("string")}
        if self.config_name == "editing":
            features["sources"] = datasets.Image()
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: images; references: prompts or instructions; sources (editing): images",
            features=datasets.Features(features),
        )

    def _compute(self, predictions, references, sources=None):
        if not references:
            raise ValueError("`references` is empty: scene checks need at least one image")
        if self.config_name == "editing":
            passed = [edit_applied(*triple) for triple in zip(sources, predictions, references)]
        else:
            passed = [shows_prompt(image, prompt) for image, prompt in zip(predictions, references)]
        return {"accuracy": sum(passed) / len(passed)}
