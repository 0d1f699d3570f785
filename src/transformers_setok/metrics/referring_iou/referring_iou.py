"""Referring segmentation: gIoU (the mean of per-image IoU) and cIoU (total intersection over total union).

Masks are boolean (or 0/1) arrays, a prediction the same shape as its reference. Empty masks: an empty
prediction for an empty reference is a perfect answer (IoU 1); any other pair with an empty side has no
intersection, so its IoU is 0 (a missed object, or an object found where none was referred to). cIoU is 1
when every mask of both sides is empty, and otherwise counts each image by its pixels, so large objects weigh
more in it than in gIoU.
"""

import datasets
import evaluate
import numpy as np


def overlap(prediction, reference) -> tuple[int, int]:
    """Intersection and union, in pixels, of two masks of the same shape."""
    prediction, reference = np.asarray(prediction, dtype=bool), np.asarray(reference, dtype=bool)
    return int((prediction & reference).sum()), int((prediction | reference).sum())


def iou(intersection: int, union: int) -> float:
    """One image's IoU; an empty prediction for an empty reference is a perfect answer."""
    return intersection / union if union else 1.0


class ReferringIou(evaluate.Metric):
    def _info(self):
        mask = datasets.Sequence(datasets.Sequence(datasets.Value("bool")))
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions, references: lists of (height, width) boolean masks, pairwise alike",
            features=datasets.Features({"predictions": mask, "references": mask}),
        )

    def _compute(self, predictions, references):
        if not references:
            raise ValueError("`references` is empty: referring IoU needs at least one mask")
        intersections, unions = [], []
        for index, (prediction, reference) in enumerate(zip(predictions, references)):
            prediction, reference = np.array(prediction, dtype=bool), np.array(reference, dtype=bool)
            if prediction.shape != reference.shape:
                raise ValueError(
                    f"`predictions[{index}]` has shape {prediction.shape} but its reference {reference.shape}"
                )
            intersection, union = overlap(prediction, reference)
            intersections.append(intersection)
            unions.append(union)
        per_image = [iou(inter, union) for inter, union in zip(intersections, unions)]
        total_union = sum(unions)
        return {
            "giou": float(np.mean(per_image)),
            "ciou": sum(intersections) / total_union if total_union else 1.0,
        }
