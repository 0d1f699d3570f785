"""Answer accuracy: the fraction of answers that equal their reference after normalisation.

Both sides are lower-cased, stripped of punctuation and of the articles "a", "an" and "the", their whitespace
collapsed, and number words up to twenty written as digits, so "Three." matches "3" and "the circle" matches
"circle". Anything else must match exactly.
"""

import re
import string

import datasets
import evaluate

NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
).split()
DIGITS = {word: str(value) for value, word in enumerate(NUMBER_WORDS)}
PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
ARTICLES = {"a", "an", "the"}


def normalize_answer(answer: str) -> str:
    words = PUNCTUATION.sub(" ", answer.lower()).split()
    return " ".join(DIGITS.get(word, word) for word in words if word not in ARTICLES)


class AnswerAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions, references: lists of answers (strings) of the same length",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        if not references:
            raise ValueError("`references` is empty: answer accuracy needs at least one answer")
        correct = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
        return {"accuracy": correct / len(references)}
