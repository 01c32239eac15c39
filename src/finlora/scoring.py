"""A test set's rows, scores and files: which rows are scored (`pick_rows`), their metrics with accuracy's 95%
interval, written as `<set>_predictions.jsonl` and `<set>_metrics.json` (`score_set`), and the table printed at the
end (`print_metrics`)."""

from __future__ import annotations

import math
import random
from pathlib import Path

from rich.console import Console
from rich.table import Table

from finlora.config import EvalSample, EvalSettings, TaskKind, TestSet
from finlora.data import proportional
from finlora.metric_names import test_score
from finlora.metrics import extract_answer, score
from finlora.outputs import write_json, write_jsonl


def pick_rows(records: list[dict], test_set: TestSet, settings: EvalSettings) -> list[int]:
    """The rows of a test set to score, in file order: all of them, or `eval.limit` drawn as `eval.sample`
    says, seeded by `eval.seed` and the set's name (FinLoRA's files are grouped by label or source, so the
    first rows are rarely a fair sample)."""
    n, limit = len(records), settings.limit
    if not limit or limit >= n:
        return list(range(n))
    if settings.sample is EvalSample.first:
        return list(range(limit))
    rng = random.Random(f"{settings.seed}:{test_set.name}")
    if settings.sample is EvalSample.stratified and test_set.kind is TaskKind.label:
        strata: dict[str, list[int]] = {}
        for i, record in enumerate(records):
            strata.setdefault(str(record["target"]).strip().lower(), []).append(i)
        groups = [strata[k] for k in sorted(strata)]
        chosen = [i for group, k in zip(groups, proportional([len(g) for g in groups], limit), strict=True)
                  for i in rng.sample(group, k)]
    else:
        chosen = rng.sample(range(n), limit)
    return sorted(chosen)


def wilson_interval(p: float, n: int, z: float = 1.96) -> list[float]:
    """The 95% Wilson score interval of a proportion p measured on n items (sound near 0 and 1, unlike p ± 2σ)."""
    if n == 0:
        return [0.0, 1.0]
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, center - half), 6), round(min(1.0, center + half), 6)]


def score_set(test_set: TestSet, records: list[dict], rows: list[int], generations: list[str], conditions: dict,
              out_dir: Path) -> tuple[dict[str, float], list[dict]]:
    """Score the answers generated for the test set's `rows`, and write `<out_dir>/<name>_predictions.jsonl` and
    `<name>_metrics.json` (the metrics, a 95% interval for accuracy, the rows scored and the `conditions` that
    can change a score)."""
    scored = [records[i] for i in rows]
    labels = test_set.labels or None
    metrics = score(test_set.kind, generations, [str(r["target"]) for r in scored], labels)
    predictions = [{"index": i, "target": str(r["target"]), "generated": g,
                    "predicted": extract_answer(test_set.kind, g, labels)}
                   for i, r, g in zip(rows, scored, generations, strict=True)]
    interval = {"accuracy_ci95": wilson_interval(metrics["accuracy"], len(rows))} if "accuracy" in metrics else {}
    write_jsonl(out_dir / f"{test_set.name}_predictions.jsonl", predictions)
    write_json(out_dir / f"{test_set.name}_metrics.json",
               metrics | interval | {"conditions": conditions, "rows": rows if len(rows) < len(records) else "all"})
    return metrics, predictions


def print_metrics(metrics: dict[str, float]) -> None:
    """The test metrics (`test/<set>/<metric>`), a row per test set, with accuracy's 95% interval (as in
    `<set>_metrics.json`)."""
    table = Table(title="test metrics")
    table.add_column("test set")
    names = sorted({k.split("/")[2] for k in metrics})
    for name in names:
        table.add_column(name, justify="right")
        if name == "accuracy":
            table.add_column("accuracy 95% interval", justify="right")
    for test_set in sorted({k.split("/")[1] for k in metrics}):
        cells = []
        for n in names:
            cells.append(_fmt(value := metrics.get(test_score(test_set, n))))
            if n == "accuracy":
                rows = metrics.get(test_score(test_set, "n"))
                cells.append("-" if value is None or not rows else
                             "[{:.4f}, {:.4f}]".format(*wilson_interval(value, int(rows))))
        table.add_row(test_set, *cells)
    Console().print(table)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{int(value)}" if float(value).is_integer() and value > 1 else f"{value:.4f}"
