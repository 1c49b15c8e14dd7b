"""Target accuracy: exact match between generated answers and reference answers, after light normalization.

Shipped inside hf_subset_select and loaded by local path (hub metrics cannot be fetched offline)::

    import evaluate
    from hf_subset_select.metrics import metric_path

    metric = evaluate.load(metric_path("target_accuracy"))
    metric.compute(predictions=["4", " 7 "], references=["4", "8"])  # {'accuracy': 0.5, ...}
"""

import datasets
import evaluate

_DESCRIPTION = """
Exact-match accuracy of predicted answers against reference answers. Both sides are normalized before comparison:
leading/trailing whitespace is removed, inner whitespace runs become one space, and (optionally) text is
lower-cased and an end-of-sequence marker is cut off. Returns the accuracy, the number of examples and the number
of correct predictions.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated answers.
    references (list of str): gold answers.
    ignore_case (bool, optional, default False): compare lower-cased text.
    stop_text (str, optional): cut each prediction at the first occurrence of this text (e.g. "<eos>").
Returns:
    accuracy (float): fraction of exact matches, in [0, 1].
    num_examples (int): number of compared pairs.
    num_correct (int): number of exact matches.
Examples:
    >>> metric = evaluate.load(metric_path("target_accuracy"))
    >>> metric.compute(predictions=["1 2", "3"], references=["1  2", "4"])
    {'accuracy': 0.5, 'num_examples': 2, 'num_correct': 1}
"""

_CITATION = ""


def _normalize(text, ignore_case, stop_text):
    text = str(text)
    if stop_text:
        cut = text.find(stop_text)
        if cut >= 0:
            text = text[:cut]
    text = " ".join(text.split())
    return text.lower() if ignore_case else text


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TargetAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, ignore_case=False, stop_text=None):
        if len(predictions) != len(references):
            raise ValueError(
                f"predictions ({len(predictions)}) and references ({len(references)}) must have the same length."
            )
        correct = sum(
            _normalize(p, ignore_case, stop_text) == _normalize(r, ignore_case, stop_text)
            for p, r in zip(predictions, references)
        )
        n = len(predictions)
        return {"accuracy": correct / n if n else 0.0, "num_examples": n, "num_correct": int(correct)}
