"""The DoRA-gap study's analysis (issues 16 and 37), read from the run files the study keeps under
docs/dora_gap/<cell>/seed<k>/ (config.yaml, metrics.json and, for jobs run since issue 37, predictions.json).

Cells are told apart by their jobs' own config.yaml (adapter, alpha, dropout, prompts, magnitude learning rate,
schedule, training files), not by folder names. Every comparison is paired by seed (`finlora.run.paired`);
the one primary comparison, pre-registered, is DoRA − LoRA at the baseline setting on the mean accuracy of the
four test sets, tested for equivalence within ±`MARGIN` (TOST at level `ALPHA`); every other comparison is
secondary, its p-values Holm-corrected as one family. Beside every test set: the commonest-label rate of the
rows scored (what always answering that label scores) and the F1 over parsed answers. Row-level tests
(McNemar, a bootstrap over seeds and rows) need kept predictions and say "not available" without them.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from finlora import metric_names as names
from finlora.data import read_jsonl
from finlora.metrics import UNPARSABLE
from finlora.outputs import write_json
from finlora.run.paired import (
    Paired,
    bootstrap_rows_and_seeds,
    commonest_label_rate,
    holm,
    mcnemar,
    paired,
    tost,
    verdict,
)
from finlora.run.report import markdown_table
from finlora.run.stats import seed_stats

TEST_SETS = ("fpb", "fiqa", "tfns", "nwgi")
MEAN = "mean of the four"
MARGIN = 0.02  # pre-registered (issue 37): DoRA and LoRA count as equivalent within ±2 points of accuracy
ALPHA = 0.05
PREDICTIONS = "predictions.json"
TFNS_PUBLISHED = "test/tfns_test.jsonl"  # FinLoRA's file with the swapped labels (the data README)


@dataclass(frozen=True, order=True)
class Setting:
    """What a cell's jobs were trained and scored with, as far as the study varies it."""

    method: str
    prompt: str = "plain"  # data.train_prompt
    alpha: float = 16.0
    dropout: float = 0.05
    mlr: float = 1.0  # adapter.magnitude_lr_scale
    eval_prompt: str = "plain"
    length: str = ""  # "300 steps", "1 epoch(s)"
    nwgi_trained: bool = False

    @property
    def label(self) -> str:
        name = {"lora": "LoRA", "dora": "DoRA"}.get(self.method, self.method)
        parts = [f"{'[INST]' if self.prompt == 'finlora_inst' else 'raw'} prompt, alpha {self.alpha:g}, "
                 f"dropout {self.dropout:g}"]
        if self.mlr != 1:
            parts.append(f"magnitude lr ×{self.mlr:g}")
        if self.eval_prompt != "plain":
            parts.append("scored on [INST]")
        if self.nwgi_trained:
            parts.append("NWGI trained")
        return f"{name}, {', '.join(parts)}, {self.length}"

    def change(self, name: str) -> str:
        """This setting's value of field `name`, in words."""
        inst = {"prompt": self.prompt, "eval_prompt": self.eval_prompt}.get(name) == "finlora_inst"
        return {"prompt": f"{'[INST]' if inst else 'raw'} training prompt", "alpha": f"alpha {self.alpha:g}",
                "dropout": f"dropout {self.dropout:g}", "mlr": f"magnitude lr ×{self.mlr:g}",
                "eval_prompt": f"{'[INST]' if inst else 'raw'} scoring", "length": self.length,
                "nwgi_trained": "NWGI trained" if self.nwgi_trained else "NWGI not trained"}[name]

    def differences(self, other: Setting) -> list[str]:
        return [f for f in ("method", "prompt", "alpha", "dropout", "mlr", "eval_prompt", "length", "nwgi_trained")
                if getattr(self, f) != getattr(other, f)]


def setting_of(cfg: DictConfig) -> Setting:
    """A job's `Setting`, from its config.yaml."""
    t = cfg.trainer
    length = f"{t.max_steps} steps" if t.max_steps and t.max_steps > 0 else f"{t.max_epochs} epoch(s)"
    return Setting(method=str(cfg.adapter.method), prompt=str(cfg.data.get("train_prompt", "plain")),
                   alpha=float(cfg.adapter.alpha), dropout=float(cfg.adapter.dropout),
                   mlr=float(cfg.adapter.get("magnitude_lr_scale", 1.0)),
                   eval_prompt=str(OmegaConf.select(cfg, "eval.prompt", default="plain")), length=length,
                   nwgi_trained=any("nwgi" in str(s.file) for s in cfg.task.train))


@dataclass
class Run:
    """One finished job: its seed, metrics and, when kept, each test set's per-row correctness."""

    seed: int
    metrics: dict
    config: DictConfig
    right: dict[str, list[bool]] = field(default_factory=dict)


def read_runs(folder: Path, data_dir: Path) -> dict[Setting, dict[int, Run]]:
    """Every job under `folder`/<cell>/seed<k>/, grouped into cells by `setting_of`; a job with kept
    predictions gets per-row correctness (and TFNS rescored on FinLoRA's published labels, `tfns_published`).
    Two jobs of one cell with the same seed are refused: a paired analysis needs one value per seed."""
    cells: dict[Setting, dict[int, Run]] = {}
    for metrics_file in sorted(folder.glob("*/seed*/metrics.json")):
        job = metrics_file.parent
        cfg = OmegaConf.load(job / "config.yaml")
        setting, seed = setting_of(cfg), int(cfg.seed)
        if seed in cells.get(setting, {}):
            raise ValueError(f"{job}: a second job of cell '{setting.label}' with seed {seed}")
        run = Run(seed, json.loads(metrics_file.read_text()), cfg)
        if (job / PREDICTIONS).is_file():
            add_predictions(run, json.loads((job / PREDICTIONS).read_text()), cfg, data_dir)
        cells.setdefault(setting, {})[seed] = run
    return cells


def add_predictions(run: Run, kept: dict, cfg: DictConfig, data_dir: Path) -> None:
    """Per-row correctness of each kept test set, against the targets of the file the job scored; TFNS also
    against FinLoRA's published (swapped) labels, when every row was scored (the two files hold the same rows
    in the same order)."""
    files = {str(t.name): str(t.file) for t in cfg.task.test}
    for name, saved in kept.items():
        targets = [str(r["target"]).strip().lower() for r in read_jsonl(data_dir / files[name])]
        rows = range(len(targets)) if saved["rows"] == "all" else saved["rows"]
        answers = decode_answers(saved)
        run.right[name] = [a == targets[i] for i, a in zip(rows, answers, strict=True)]
        if name == "tfns" and saved["rows"] == "all" and files[name] != TFNS_PUBLISHED:
            published = [str(r["target"]).strip().lower() for r in read_jsonl(data_dir / TFNS_PUBLISHED)]
            run.right["tfns_published"] = [a == t for a, t in zip(answers, published, strict=True)]
            run.metrics[names.test_score("tfns_published", "accuracy")] = statistics.fmean(run.right["tfns_published"])


def keep_predictions(eval_dir: Path, labels: dict[str, list[str]], target: Path) -> None:
    """A job's `<set>_predictions.jsonl` (finlora.evaluate) as one small file: per set its labels, the rows
    scored ("all" or their indices) and one character per row, the index of the answer's label or `-` for
    an unparsable answer. The generated texts stay in the job's folder."""
    kept = {}
    for name, set_labels in labels.items():
        rows = [json.loads(line) for line in (eval_dir / f"{name}_predictions.jsonl").read_text().splitlines()]
        index = [r["index"] for r in rows]
        code = {label: str(i) for i, label in enumerate(set_labels)} | {UNPARSABLE: "-"}
        kept[name] = {"labels": set_labels, "rows": "all" if index == list(range(len(index))) else index,
                      "answers": "".join(code[r["predicted"]] for r in rows)}
    write_json(target, kept)


def decode_answers(saved: dict) -> list[str]:
    return [UNPARSABLE if c == "-" else saved["labels"][int(c)] for c in saved["answers"]]


def values(cell: dict[int, Run], metric: str) -> dict[int, float]:
    """seed → the metric; `mean/<name>`: the mean over the four test sets."""
    if metric.startswith("mean/"):
        name = metric.split("/", 1)[1]
        return {s: statistics.fmean(r.metrics[names.test_score(t, name)] for t in TEST_SETS) for s, r in cell.items()
                if all(isinstance(r.metrics.get(names.test_score(t, name)), int | float) for t in TEST_SETS)}
    return {s: r.metrics[metric] for s, r in cell.items() if isinstance(r.metrics.get(metric), int | float)}


@dataclass(frozen=True)
class Comparison:
    what: str
    a: Setting
    b: Setting
    primary: bool = False
    equivalence: bool = False  # DoRA − LoRA under the same settings: tested against the margin


def comparisons(settings: list[Setting]) -> list[Comparison]:
    """DoRA − LoRA at every setting both ran (the baseline's is the primary one); within each adapter, each
    setting that differs from the baseline in one respect, against it; FinLoRA's published recipes against
    each other; and issue 16's "FinLoRA comparison", kept to show what it measured."""
    have = set(settings)
    out = []
    main_length = Counter(s.length for s in settings).most_common(1)[0][0]  # the study's main schedule
    for s in sorted(have):
        if s.method == "dora" and s.mlr == 1 and (lora := replace(s, method="lora")) in have:
            primary = s == baseline_of("dora", main_length)
            out.append(Comparison(f"DoRA − LoRA: {s.label.split(', ', 1)[1]}", s, lora, primary, True))
    for s in sorted(have):  # one change against the baseline, or against the cell it was added to
        bases = {baseline_of(s.method, s.length), replace(s, eval_prompt="plain"), replace(s, length=main_length),
                 replace(s, nwgi_trained=False)}
        for base in sorted(bases & have):
            if len(changed := s.differences(base)) == 1:
                against = "baseline" if base == baseline_of(s.method, s.length) else base.change(changed[0])
                out.append(Comparison(f"{s.label.split(',')[0]}: {s.change(changed[0])} − {against} "
                                      f"({s.label.split(', ', 1)[1]})", s, base))
    for what, a, b in NAMED:
        for length in sorted({s.length for s in have}):
            if replace(a, length=length) in have and replace(b, length=length) in have:
                out.append(Comparison(f"{what}, {length}", replace(a, length=length), replace(b, length=length)))
    return out


def baseline_of(method: str, length: str) -> Setting:
    return Setting(method, length=length)


# Cross comparisons, by their adapter settings and prompts (schedules matched).
NAMED = [
    ("FinLoRA's published sentiment adapters: DoRA ([INST], alpha 16, dropout 0.05) − LoRA (raw, alpha 32, "
     "dropout 0.1)", Setting("dora", "finlora_inst", 16, 0.05), Setting("lora", "plain", 32, 0.1)),
    ("issue 16's 'FinLoRA comparison': DoRA ([INST], alpha 32, dropout 0.1) − LoRA baseline (no published "
     "FinLoRA run has these DoRA settings)", Setting("dora", "finlora_inst", 32, 0.1), Setting("lora")),
]


@dataclass
class Line:
    """One comparison on one metric: the paired difference, its tests and the row-level evidence."""

    comparison: Comparison
    metric: str
    diff: Paired
    p_holm: float | None = None
    rows: str = "not available"

    @property
    def primary(self) -> bool:
        """The one pre-registered test: the primary comparison on the mean of the four sets."""
        return self.comparison.primary and self.metric == "mean/accuracy"

    @property
    def equivalence(self):
        return tost(self.diff, MARGIN, ALPHA) if self.comparison.equivalence else None

    @property
    def verdict(self) -> str:
        return verdict(self.diff, self.equivalence, None if self.primary else self.p_holm, ALPHA)


def analyse(cells: dict[Setting, dict[int, Run]], sets: list[str]) -> list[Line]:
    """Every comparison on each test set's accuracy and the mean, paired by seed; Holm over the secondary ones."""
    lines = []
    for c in comparisons(list(cells)):
        for metric in [names.test_score(t, "accuracy") for t in sets] + ["mean/accuracy"]:
            a, b = values(cells[c.a], metric), values(cells[c.b], metric)
            if a.keys() & b.keys():
                lines.append(Line(c, metric, paired(a, b), rows=row_evidence(cells[c.a], cells[c.b], metric)))
    secondary = [x for x in lines if not x.primary and x.diff.p is not None]
    for x, p in zip(secondary, holm([x.diff.p for x in secondary]), strict=True):
        x.p_holm = p
    return lines


def row_evidence(a: dict[int, Run], b: dict[int, Run], metric: str) -> str:
    """McNemar's exact test on the discordant rows pooled over the paired seeds, and the bootstrap interval
    over seeds and rows; "not available" unless both cells kept the set's predictions for a common seed."""
    name = metric.split("/")[1]
    seeds = [s for s in sorted(a.keys() & b.keys()) if name in a[s].right and name in b[s].right]
    if not seeds or name == "accuracy":
        return "not available"
    tests = [mcnemar(a[s].right[name], b[s].right[name]) for s in seeds]
    a_only, b_only = sum(t.a_only for t in tests), sum(t.b_only for t in tests)
    pooled = replace(tests[0], a_only=a_only, b_only=b_only, rows=sum(t.rows for t in tests))
    diff, low, high = bootstrap_rows_and_seeds({s: a[s].right[name] for s in seeds},
                                               {s: b[s].right[name] for s in seeds})
    return (f"{100 * diff:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] (bootstrap, {len(seeds)} seeds); McNemar "
            f"{a_only}:{b_only} rows, p = {pooled.p:.3g}")


def base_rate(cfg: DictConfig, name: str, data_dir: Path) -> tuple[str, float, int]:
    """The commonest label of the rows a job scored of test set `name`, its share (what always answering that
    label scores) and the number of rows; the rows drawn again exactly as `finlora.evaluate.pick_rows` drew
    them (`tfns_published`: the TFNS rows, on FinLoRA's published labels)."""
    test = next(t for t in cfg.task.test if t.name == ("tfns" if name == "tfns_published" else name))
    return _base_rate(str(data_dir), str(test.file), tuple(test.labels), name, cfg.eval.limit, str(cfg.eval.sample),
                      int(cfg.eval.seed))


@lru_cache
def _base_rate(data_dir: str, file: str, labels: tuple[str, ...], name: str, limit: int | None, sample: str,
               seed: int) -> tuple[str, float, int]:
    from finlora.config import EvalSample, EvalSettings, TestSet
    from finlora.evaluate import pick_rows

    test_set = TestSet(name="tfns" if name == "tfns_published" else name, file=file, labels=list(labels))
    rows = pick_rows(read_jsonl(Path(data_dir) / file), test_set, EvalSettings(limit=limit, sample=EvalSample(sample),
                                                                                 seed=seed))
    records = read_jsonl(Path(data_dir) / (TFNS_PUBLISHED if name == "tfns_published" else file))
    label, rate = commonest_label_rate([records[i]["target"] for i in rows])
    return label, rate, len(rows)


def pct(x: float | None, signed: bool = False) -> str:
    return "-" if x is None else f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def cell_tables(cells: dict[Setting, dict[int, Run]], data_dir: Path, sets: list[str]) -> Iterator[str]:
    """Per test set: each cell's accuracy (mean ± sd over seeds [95% t interval]), weighted F1, F1 over the
    parsed answers and unparsable share, beside the commonest-label rate of the rows it scored."""
    for name in [*sets, MEAN]:
        metric = "mean" if name == MEAN else f"test/{name}"
        yield f"### {name}" + (f" ({', '.join(TEST_SETS)})" if name == MEAN else "")
        body = []
        for s in sorted(cells):
            acc = values(cells[s], f"{metric}/accuracy")
            if not acc:
                continue
            stats = seed_stats(list(acc.values()))
            floor = "" if name == MEAN else "{1} ({0}, {2} rows)"
            if floor:
                label, rate, n = base_rate(next(iter(cells[s].values())).config, name, data_dir)
                floor = f"{pct(rate)} ({label}, {n} rows)"
                mark = " ✓" if stats.low is not None and stats.low > rate else " ✗" if stats.mean <= rate else ""
            means = [statistics.fmean(v.values()) if (v := values(cells[s], f"{metric}/{m}")) else None
                     for m in ("f1", "f1_parsed", "unparsable_rate")]
            body.append([s.label, ",".join(map(str, sorted(acc))), stats.text(scale=100, digits=1)
                         + (mark if floor else ""), *([floor] if floor else []), *(pct(m) for m in means)])
        yield ""
        yield from markdown_table(["cell", "seeds", "accuracy %", *(["commonest label %"] if name != MEAN else []),
                                   "weighted F1 %", "F1 parsed %", "unparsable %"], body)
        yield ""


def comparison_table(lines: list[Line], keep: Callable[[Line], bool]) -> list[str]:
    body = []
    for x in filter(keep, lines):
        d, eq = x.diff, x.equivalence
        interval = f"[{pct(d.low, True)}, {pct(d.high, True)}]" if d.low is not None else "(one pair)"
        body.append([x.comparison.what, x.metric.split("/")[1] if x.metric.startswith(names.TEST_PREFIX) else MEAN,
                     ",".join(map(str, d.seeds)), pct(d.mean, True) + " " + interval,
                     "-" if d.p is None else f"{d.p:.3g}", "-" if x.p_holm is None else f"{x.p_holm:.3g}",
                     "-" if eq is None else f"[{pct(eq.low, True)}, {pct(eq.high, True)}], p = {eq.p:.3g}",
                     x.verdict, x.rows])
    return markdown_table(["a − b", "set", "seeds", "paired difference, points [95%]", "p", "p (Holm)",
                           f"TOST ±{100 * MARGIN:g}: 90% interval", "verdict", "rows (from kept predictions)"], body)


def preregistration() -> list[str]:
    """What the analysis tests and how, stated in the report before any result."""
    return ["## Pre-registered analysis", "",
            f"Fixed before the runs of issue 37 (for the earlier runs below it is applied after the fact). Every "
            f"difference is paired by seed (a seed fixes the data order and the initialisation in every cell), "
            f"with a 95% Student-t interval over the seeds. **Primary:** DoRA − LoRA at the baseline setting, on "
            f"the mean accuracy of the four test sets: equivalent if two one-sided t tests reject a difference of "
            f"±{100 * MARGIN:g} points at level {ALPHA} (the 90% interval inside ±{100 * MARGIN:g}). **Secondary** "
            f"(every other line, each test set and the mean): p-values Holm-corrected as one family; a verdict "
            f"'differs' needs Holm p < {ALPHA}, 'equivalent' (DoRA − LoRA lines only) the TOST; anything else is "
            f"'inconclusive'. Row-level evidence (McNemar's exact test on the discordant rows, a bootstrap over "
            f"seeds and rows) is computed from kept predictions, where jobs kept them.", ""]


def report_sections(folder: Path, data_dir: Path) -> list[str]:
    """The results part of docs/dora_gap.md: the primary result, the cells, the comparisons."""
    cells = read_runs(folder, data_dir)
    if not cells:
        return ["No job has finished yet."]
    sets = [*TEST_SETS] + (["tfns_published"] if any("tfns_published" in r.right for c in cells.values()
                                                     for r in c.values()) else [])
    lines = analyse(cells, sets)
    primary = [x for x in lines if x.primary]
    out = ["## Results", ""]
    if primary:
        x = primary[0]
        eq = x.equivalence
        out += [f"**Primary result:** {x.comparison.what}, {MEAN}: {pct(x.diff.mean, True)} points "
                + (f"[{pct(x.diff.low, True)}, {pct(x.diff.high, True)}] (95%, {x.diff.n} seeds); 90% interval "
                   f"[{pct(eq.low, True)}, {pct(eq.high, True)}] against ±{100 * MARGIN:g}, TOST p = {eq.p:.3g}: "
                   f"**{x.verdict}**." if eq else f"({x.diff.n} seeds): **{x.verdict}**."), ""]
    out += ["## Cells, per test set", "",
            "Accuracy: mean ± standard deviation over seeds [95% t interval of the mean]; ✓: the interval lies "
            "above the commonest-label rate (always answering the commonest label of the rows scored), ✗: the mean "
            "does not clear it. F1 (weighted, unparsable answers a class of their own), F1 over the parsed answers "
            "and the unparsable share: means over seeds.",
            "", *cell_tables(cells, data_dir, sets),
            "## DoRA − LoRA under the same settings (equivalence margin ±2 points)", "",
            *comparison_table(lines, lambda x: x.comparison.equivalence), "",
            "## Other comparisons (secondary: Holm-corrected; read as exploratory)", "",
            *comparison_table(lines, lambda x: not x.comparison.equivalence), ""]
    return out
