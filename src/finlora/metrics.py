"""Answer parsing and metrics for FinLoRA's tasks, computed the way FinLoRA computes them.

FinLoRA's evaluation (``test/test_dataset.py`` in its repository) counts an answer correct when the
lower-cased target occurs in the lower-cased generation, and builds the weighted F1 from a "response"
list that holds the target when correct and the raw generation otherwise. finlora keeps that F1
construction but decides correctness with a stricter, unambiguous rule: the predicted label is the task
label that appears *first* in the generation (FinLoRA's substring test accepts "positive or negative" as
right for either label). Every deviation from FinLoRA is named in the docstring where it happens.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal

from finlora.config import TaskKind
from finlora.metric_names import SCORE_NAMES

UNPARSABLE = "unparsable"


def parse_label(generated: str, labels: Sequence[str]) -> str | None:
    """Return the label (as spelled in ``labels``) that starts first in ``generated``, or None.

    Matching is case-insensitive plain substring search, as in FinLoRA (so "positively" yields
    "positive"). Where several labels start at the same position the longest wins, so "mildly positive"
    beats "positive"; a label nested inside a longer match ("positive" in "mildly positive") always
    starts later than that match and therefore cannot win.
    """
    text = generated.lower()
    best: tuple[int, int, str] | None = None  # (start, -length, label): smallest tuple wins
    for label in labels:
        start = text.find(label.lower()) if label else -1
        if start >= 0:
            candidate = (start, -len(label), label)
            if best is None or candidate < best:
                best = candidate
    return None if best is None else best[2]


_NUMBER = re.compile(r"(?<![\w.])(-?)\$?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")


def parse_number(generated: str) -> Decimal | None:
    """Return the first number in ``generated`` rounded to 2 decimals, or None.

    Accepts thousands separators ("1,234.567"), a currency sign ("$12.5", "-$3") and a leading minus.
    Rounding is decimal half-up on the written digits, so "0.125" gives 0.13 and "2.675" gives 2.68,
    free of binary-float artefacts (Python's ``round(2.675, 2)`` is 2.67).
    """
    match = _NUMBER.search(generated)
    if match is None:
        return None
    value = Decimal(match.group(1) + match.group(2).replace(",", ""))
    return value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def split_tags(text: str) -> list[str]:
    """Split a comma-separated tag list the way FinLoRA does: strip each piece and drop newlines."""
    return [tag.strip().replace("\n", "") for tag in text.split(",")]


_TOKEN = re.compile(r"\w+(?:[.,]\w+)*")


def _tokens(text: str) -> list[str]:
    """Lower-cased word tokens; "1,832.5" and "u.s" stay single tokens so numbers compare whole."""
    return _TOKEN.findall(text.lower())


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (longest common token subsequence, beta = 1) between two texts.

    Chosen for the free-text tasks because it needs no model or network (FinLoRA's BERTScore needs a
    RoBERTa download), rewards the reference's words in the reference's order (an XBRL definition with
    the words shuffled should not score 1, as it would with bag-of-words token F1), and is the usual
    summarisation overlap metric, so its scale is familiar. No stemming, no stop-word removal.
    """
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)
    for p in pred:
        current = [0]
        for j, r in enumerate(ref):
            current.append(previous[j] + 1 if p == r else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def weighted_f1(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    """F1 per class averaged with the classes' true support as weights (scikit-learn's "weighted").

    Classes that occur only in ``y_pred`` have zero weight but still lower the recall of the true
    classes; this equals ``sklearn.metrics.f1_score(y_true, y_pred, average="weighted")``.
    """
    support = Counter(y_true)
    predicted = Counter(y_pred)
    hits = Counter(t for t, p in zip(y_true, y_pred, strict=True) if t == p)
    total = 0.0
    for label, n_true in support.items():
        tp = hits[label]
        if tp:
            precision, recall = tp / predicted[label], tp / n_true
            total += n_true * 2 * precision * recall / (precision + recall)
    return total / len(y_true)


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("nothing to score")


def _score_label(
    predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]
) -> dict[str, float]:
    """Accuracy, FinLoRA's weighted F1, a conventional weighted F1, and the unparsable rate.

    ``f1`` follows FinLoRA: the response is the reference when correct and otherwise the generation
    itself (stripped; lower-cased here, where FinLoRA keeps the case), so a wrong answer that is exactly
    another label counts against that label's precision and any other wrong or unparsable answer is a
    class of its own. ``f1_parsed`` is the textbook weighted F1 of the parsed labels, with every
    unparsable answer pooled in one "unparsable" class; it does not depend on how the answer is worded.
    """
    refs = [r.strip().lower() for r in references]
    parsed = [parse_label(p, labels) for p in predictions]
    parsed_norm = [UNPARSABLE if p is None else p.lower() for p in parsed]
    correct = [p == r for p, r in zip(parsed_norm, refs, strict=True)]
    responses = [r if ok else p.strip().lower() for p, r, ok in zip(predictions, refs, correct, strict=True)]
    n = len(refs)
    return {
        "accuracy": sum(correct) / n,
        "f1": weighted_f1(refs, responses),
        "f1_parsed": weighted_f1(refs, parsed_norm),
        "unparsable_rate": parsed.count(None) / n,
        "n": float(n),
    }


def _score_numeric(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Exact match after rounding both sides to 2 decimals; an unparsable generation is wrong."""
    parsed = [parse_number(p) for p in predictions]
    refs = [parse_number(r) for r in references]
    if None in refs:
        raise ValueError(f"reference without a number: {references[refs.index(None)]!r}")
    n = len(refs)
    return {
        "accuracy": sum(p is not None and p == r for p, r in zip(parsed, refs, strict=True)) / n,
        "unparsable_rate": parsed.count(None) / n,
        "n": float(n),
    }


def _score_tags(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Per-entity accuracy: the i-th predicted tag against the i-th reference tag, over all entities.

    As in FinLoRA, extra predicted tags are dropped and missing ones count wrong. FinLoRA counts a tag
    right when the reference tag is a substring of the predicted one; here the tags must be equal
    (case-insensitive), since "Goodwill" inside "GoodwillImpairmentLoss" is a different US-GAAP tag.
    """
    correct = total = 0
    for prediction, reference in zip(predictions, references, strict=True):
        ref_tags = split_tags(reference)
        pred_tags = split_tags(prediction)[: len(ref_tags)]
        correct += sum(p.lower() == r.lower() for p, r in zip(pred_tags, ref_tags, strict=False))
        total += len(ref_tags)
    return {"accuracy": correct / total, "n": float(len(references)), "n_entities": float(total)}


def score(
    kind: TaskKind,
    predictions: Sequence[str],
    references: Sequence[str],
    labels: Sequence[str] | None = None,
) -> dict[str, float]:
    """Score raw generations against references; ``labels`` is required for label tasks.

    Keys: `SCORE_NAMES[kind]` (text tasks: rouge_l_f1, not FinLoRA's BERTScore).
    """
    _check(predictions, references)
    kind = TaskKind(kind)
    if kind is TaskKind.label:
        if not labels:
            raise ValueError("label tasks need their labels")
        scores = _score_label(predictions, references, labels)
    elif kind is TaskKind.numeric:
        scores = _score_numeric(predictions, references)
    elif kind is TaskKind.tags:
        scores = _score_tags(predictions, references)
    else:
        overlaps = [rouge_l_f1(p, r) for p, r in zip(predictions, references, strict=True)]
        scores = {"rouge_l_f1": sum(overlaps) / len(overlaps), "n": float(len(overlaps))}
    return {name: scores[name] for name in SCORE_NAMES[kind.value]}


def extract_answer(kind: TaskKind, generated: str, labels: Sequence[str] | None = None) -> str:
    """The normalised answer to save next to each example, so predictions can be checked by eye."""
    kind = TaskKind(kind)
    if kind is TaskKind.label:
        if not labels:
            raise ValueError("label tasks need their labels")
        return parse_label(generated, labels) or UNPARSABLE
    if kind is TaskKind.numeric:
        number = parse_number(generated)
        return UNPARSABLE if number is None else str(number)
    if kind is TaskKind.tags:
        return ",".join(split_tags(generated))
    return generated.strip()
