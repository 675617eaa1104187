"""Labels and thresholds over a classifier's logits, as a Python plugin: what transformers'
text-classification pipeline answers, after an encoder that returns logits.

Input LOGITS (FP32, [..., num_labels]: one row of logits per text). Outputs, one per row:
LABELS (BYTES): a JSON array of {"label", "score"}, best first, the top `top_k` whose score
reaches `min_score`; LABEL (BYTES): the decision: the best label if its score reaches
`threshold`, else `fallback_label`; SCORES (FP32, [..., num_labels]): every label's score.

Label names: the `labels` parameter (comma-separated), else `id2label` of a `config.json` in
the version folder (the checkpoint's own; `wisp import` writes one), else LABEL_0, LABEL_1, …

Parameters (config.toml; all but `labels` may be changed per request):
  function_to_apply  softmax (one label per text), sigmoid (independent labels), or none
                     (default: sigmoid for a config.json whose problem_type is
                     multi_label_classification or that has one label, else softmax)
  top_k              labels in LABELS (default 1; 0: all)
  min_score          lowest score a label in LABELS may have (default 0; with sigmoid and
                     top_k = 0: every label that applies)
  threshold          lowest score LABEL is given for (default 0)
  fallback_label     LABEL when the best score is below the threshold (default "")
"""

import json
import math

import wisp_plugin
from wisp_plugin import InvalidInput, Tensor

FUNCTIONS = ("softmax", "sigmoid", "none")


def softmax(row):
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def sigmoid(row):
    # Stable for large |v|: exp never overflows.
    return [1 / (1 + math.exp(-v)) if v >= 0 else math.exp(v) / (1 + math.exp(v)) for v in row]


def scores(row, function):
    if function == "softmax":
        return softmax(row)
    if function == "sigmoid":
        return sigmoid(row)
    return list(row)


def ranked(labels, row_scores, top_k, threshold):
    """[(label, score)] best first (ties: the lower label id first), at most top_k (0: all)."""
    order = sorted(range(len(row_scores)), key=lambda i: (-row_scores[i], i))
    picked = [(labels[i], row_scores[i]) for i in order if row_scores[i] >= threshold]
    return picked[:top_k] if top_k > 0 else picked


class Settings:
    """The settings of one request: the config's, overridden by the request's parameters."""

    NAMES = ("function_to_apply", "top_k", "min_score", "threshold", "fallback_label")

    def __init__(self, base, overrides):
        merged = {**base, **{k: v for k, v in overrides.items()
                             if k in self.NAMES}}
        self.function = str(merged["function_to_apply"])
        if self.function not in FUNCTIONS:
            raise InvalidInput(f"function_to_apply is '{self.function}': it must be one of "
                               f"{', '.join(FUNCTIONS)}")
        top_k = merged["top_k"]
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise InvalidInput(f"top_k is {top_k!r}: it must be an integer >= 0")
        self.top_k = top_k
        for name in ("min_score", "threshold"):
            value = merged[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise InvalidInput(f"{name} is {value!r}: it must be a finite number")
            setattr(self, name, float(value))
        self.fallback = str(merged["fallback_label"])


class ClassifyLabels(wisp_plugin.Model):
    def initialize(self, info):
        parameters = info.parameters
        checkpoint = {}
        try:
            with open("config.json", encoding="utf-8") as f:
                checkpoint = json.load(f)
        except FileNotFoundError:
            pass
        except ValueError as e:
            raise wisp_plugin.Unavailable(f"config.json is not valid JSON: {e}") from None
        if "labels" in parameters:
            self.labels = [s.strip() for s in str(parameters["labels"]).split(",")]
        elif "id2label" in checkpoint:
            id2label = checkpoint["id2label"]
            self.labels = [str(id2label[str(i)]) for i in range(len(id2label))]
        else:
            self.labels = None  # LABEL_i, as many as the logits have
        multi = checkpoint.get("problem_type") == "multi_label_classification" \
            or (self.labels is not None and len(self.labels) == 1)
        self.base = {
            "function_to_apply": parameters.get("function_to_apply", "sigmoid" if multi else "softmax"),
            "top_k": parameters.get("top_k", 1),
            "min_score": parameters.get("min_score", 0.0),
            "threshold": parameters.get("threshold", 0.0),
            "fallback_label": parameters.get("fallback_label", ""),
        }
        Settings(self.base, {})  # a bad config fails the load, not every request

    def execute(self, request):
        settings = Settings(self.base, request.parameters)
        logits = request.input("LOGITS")
        if logits.datatype != "FP32" or not logits.shape:
            raise InvalidInput("LOGITS must be FP32 with the labels as its last dimension")
        width = logits.shape[-1]
        labels = self.labels or [f"LABEL_{i}" for i in range(width)]
        if width != len(labels):
            raise InvalidInput(f"LOGITS has {width} values a row, but the model has "
                               f"{len(labels)} labels")
        values = logits.to_list()
        rows = [values[i:i + width] for i in range(0, len(values), width)] if width else []
        all_scores, answers, best = [], [], []
        for index, row in enumerate(rows):
            if not all(math.isfinite(v) for v in row):
                raise InvalidInput(f"LOGITS row {index} has a value that is not a finite number")
            row_scores = scores(row, settings.function)
            picked = ranked(labels, row_scores, settings.top_k, settings.min_score)
            all_scores += row_scores
            answers.append(json.dumps([{"label": label, "score": score} for label, score in picked],
                                      ensure_ascii=False))
            # max keeps the first of equal scores: the lower label id, as `ranked` does.
            top = max(range(width), key=row_scores.__getitem__)
            best.append(labels[top] if row_scores[top] >= settings.threshold else settings.fallback)
        per_row = list(logits.shape[:-1]) + [1] if len(logits.shape) > 1 else [1]
        return [
            Tensor.from_strings("LABELS", per_row, answers),
            Tensor.from_strings("LABEL", per_row, best),
            Tensor.from_list("SCORES", "FP32", logits.shape, all_scores),
        ]


Model = wisp_plugin.export(ClassifyLabels)
