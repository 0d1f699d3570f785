"""Reconstruction PSNR: the mean over images of 10 log10(data_range^2 / MSE), in dB.

Images are arrays of any shape (usually (height, width, channels)), a reconstruction the same shape as its
original. `data_range` is the largest value a pixel can take: 1.0 (the default) for images in [0, 1], 255 for
uint8 images; a value outside [0, data_range] is a ValueError, which catches a forgotten `data_range=255`.
An exact reconstruction has an infinite PSNR, and so does the mean of a set that holds one.
"""

import datasets
import evaluate
import numpy as np


class ReconstructionPsnr(evaluate.Metric):
    def _info(self):
        image = datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("float64"))))
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=(
                "predictions, references: lists of (height, width, channels) images, pairwise alike; "
                "data_range: 1.0 for [0, 1] images (default), 255 for uint8"
            ),
            features=datasets.Features({"predictions": image, "references": image}),
        )

    def _compute(self, predictions, references, data_range: float = 1.0):
        if not references:
            raise ValueError("`references` is empty: PSNR needs at least one image")
        if data_range <= 0:
            raise ValueError(f"`data_range` must be positive, got {data_range}")
        scores = []
        for index, (prediction, reference) in enumerate(zip(predictions, references)):
            prediction, reference = np.array(prediction, dtype=np.float64), np.array(reference, dtype=np.float64)
            if prediction.shape != reference.shape:
                raise ValueError(
                    f"`predictions[{index}]` has shape {prediction.shape} but its reference {reference.shape}"
                )
            for name, image in (("predictions", prediction), ("references", reference)):
                if image.min() < 0 or image.max() > data_range:
                    raise ValueError(
                        f"`{name}[{index}]` has values outside [0, {data_range}]; pass data_range=255 for uint8"
                    )
            mse = np.mean((prediction - reference) ** 2)
            scores.append(float("inf") if mse == 0 else 10 * np.log10(data_range**2 / mse))
        return {"psnr": float(np.mean(scores))}
