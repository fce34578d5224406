"""Seeds -> numbers: mean, sample sd and a bootstrap interval per (row, metric), from workdirs.

For values x_1..x_n of one metric over n seeds:
  mean = sum(x) / n,  sd = sqrt(sum((x - mean)^2) / (n - 1))  (sample sd, ddof=1; nan when n = 1),
  95% bootstrap interval (Efron & Tibshirani 1993, percentile method): draw B = 10,000 resamples of
  size n with replacement from a seeded generator, take each resample's mean, report the 2.5th and
  97.5th percentiles of those means. The generator is seeded so a table is reproducible bit for bit.

Units: papers write accuracy 92.23 where jaxft's metrics are 0.9223. With units="auto" a metric is
shown x100 when all our values lie in [-1, 1] and it is a fraction (accuracy, F1, MCC, correlation,
sparsity, ...: `is_fraction`) or the paper gives it above 1.5; counts and rates stay as they are.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Iterable, Mapping, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


@dataclasses.dataclass(frozen=True)
class Summary:
  """One table cell: n values of a metric over seeds, summarised."""

  n: int
  mean: float
  sd: float  # sample sd (ddof=1); nan for n = 1
  ci_low: float
  ci_high: float
  values: tuple[float, ...]


def bootstrap_ci(values: Sequence[float], *, confidence: float = 0.95,
                 resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
                 ) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean of `values` (1-D, n >= 1).

  Resample indices are rng.integers(0, n, size=(resamples, n)) from np.random.default_rng(seed);
  with n = 1 (or all values equal) the interval collapses to the value.
  """
  x = np.asarray(values, np.float64)
  if x.ndim != 1 or x.size == 0:
    raise ValueError(f"bootstrap_ci needs a non-empty 1-D list of values, got shape {x.shape}")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, x.size, size=(resamples, x.size))
  means = x[idx].mean(axis=1)
  alpha = (1.0 - confidence) / 2.0
  low, high = np.percentile(means, [100 * alpha, 100 * (1 - alpha)])
  return float(low), float(high)


def summarize(values: Iterable[float], *, seed: int = BOOTSTRAP_SEED,
              resamples: int = BOOTSTRAP_RESAMPLES) -> Summary:
  """values over seeds -> Summary(mean, sample sd, 95% percentile-bootstrap interval)."""
  x = np.asarray([float(v) for v in values], np.float64)
  if x.size == 0:
    raise ValueError("summarize: no values (no finished runs for this cell)")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"summarize: non-finite values {x.tolist()}; a run diverged, check its workdir")
  sd = float(np.std(x, ddof=1)) if x.size > 1 else math.nan
  low, high = bootstrap_ci(x, seed=seed, resamples=resamples)
  return Summary(n=int(x.size), mean=float(x.mean()), sd=sd, ci_low=low, ci_high=high,
                 values=tuple(float(v) for v in x))


def scale(summary: Summary, factor: float) -> Summary:
  """The same summary with every number multiplied by `factor` (e.g. 100 for percent)."""
  return Summary(n=summary.n, mean=summary.mean * factor, sd=summary.sd * abs(factor),
                 ci_low=summary.ci_low * factor, ci_high=summary.ci_high * factor,
                 values=tuple(v * factor for v in summary.values))


def read_results(workdir: str | pathlib.Path) -> dict | None:
  """<workdir>/results.json as a dict, or None if the run has not finished. Evaluations of the
  finished run (`jaxft eval` writes eval_<split>_<which>.json) join it under their file's stem,
  e.g. results["eval_validation_best"]["robustness"]."""
  workdir = pathlib.Path(workdir)
  path = workdir / "results.json"
  if not path.is_file():
    return None
  results = json.loads(path.read_text())
  for extra in sorted(workdir.glob("eval_*.json")):
    results.setdefault(extra.stem, json.loads(extra.read_text()))
  if (workdir / "metrics.jsonl").is_file() and results.get("steps"):
    results.setdefault("train_mean", train_quarters(workdir / "metrics.jsonl", results["steps"]))
  return results


def train_quarters(metrics_file: str | pathlib.Path, steps: int) -> dict:
  """{"q1".."q4": {metric: mean}}: each logged train metric averaged over the log steps in each
  quarter of the run's `steps` (q4: steps in (3/4 steps, steps]), e.g. the path
  "train_mean/q4/unsup/pseudo_label_accuracy" of a semi-supervised run. One log step sees one
  batch; a quarter's mean is the trace a table can print. A step logged twice (a resumed run
  repeats the steps after its last checkpoint, with the same numbers) counts once."""
  by_step = {}
  for line in pathlib.Path(metrics_file).read_text().splitlines():
    rec = json.loads(line) if line.strip() else {}
    if rec.get("kind") == "train" and isinstance(rec.get("step"), int):
      by_step[rec["step"]] = rec
  out = {}
  for q in range(4):
    lo, hi = steps * q / 4, steps * (q + 1) / 4
    recs = [r for s, r in by_step.items() if lo < s <= hi]
    keys = {k for r in recs for k, v in r.items()
            if k not in ("kind", "step", "time") and isinstance(v, (int, float))}
    out[f"q{q + 1}"] = {k: float(np.mean([r[k] for r in recs if k in r])) for k in sorted(keys)}
  return out


def lookup(tree: Mapping, path: str):
  """tree["a"]["b/c"]... for the path "a/b/c": keys may themselves hold "/" ("sparsity/total",
  "pgd_l2/1.0/accuracy"), so at each level the longest matching key wins. None if absent."""
  if path in tree:
    return tree[path]
  parts = path.split("/")
  for i in range(len(parts) - 1, 0, -1):
    head = "/".join(parts[:i])
    if isinstance(tree.get(head), Mapping):
      found = lookup(tree[head], "/".join(parts[i:]))
      if found is not None:
        return found
  return None


def metric_of(results: dict, metric: str | None = None, which: str = "eval") -> tuple[str, float]:
  """(name, value) of `metric` (default: the run's main_metric) from results[which], else from the
  results' other numbers by path: "trainable_params", "train_examples_per_s",
  "last_train/sparsity/total", "eval_validation_best/robustness/pgd/pgd_l2/1.0/accuracy", ...

  which: "eval" (metrics at the end of training) or "best" (at the best eval by the main metric).
  """
  if which not in ("eval", "best"):
    raise ValueError(f"which must be 'eval' or 'best', got {which!r}")
  name = metric or results.get("main_metric")
  block = results.get(which) or {}
  if name in block:
    return name, float(block[name])
  value = lookup(results, name) if name else None
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return name, float(value)
  raise KeyError(f"metric {name!r} not in results[{which!r}] of {results.get('experiment')!r} "
                 f"seed {results.get('seed')}; it has {sorted(block)} (or give a path into "
                 "results.json such as trainable_params). Pass --metric with one of them")


FRACTION_WORDS = ("accuracy", "f1", "mcc", "pearson", "spearman", "precision", "recall",
                  "sparsity", "average", "forgetting")


def is_fraction(metric: str) -> bool:
  """Whether a metric name (or path) names a number in [0, 1] (or [-1, 1]) that papers print x100."""
  return any(word in part for part in metric.lower().split("/") for word in FRACTION_WORDS)


@dataclasses.dataclass
class Cell:
  """A table row's numbers for one metric, with the paper's value when the experiment gives one."""

  row: str
  metric: str
  summary: Summary
  paper: float | None = None
  scale: float = 1.0  # what our raw values were multiplied by to match the paper's units
  primary: bool = True  # the row's main metric or one the paper gives (False: a METRICS column)

  @property
  def diff(self) -> float | None:
    return None if self.paper is None else self.summary.mean - self.paper


def _metric_list(metric) -> list[str]:
  if not metric:
    return []
  if isinstance(metric, str):
    return [m.strip() for m in metric.split(",") if m.strip()]
  return list(metric)


def build_cells(results_by_row: dict[str, list[dict]], paper: dict | None = None,
                metric: str | Sequence[str] | None = None, which: str = "eval",
                units: str = "auto", seed: int = BOOTSTRAP_SEED,
                extra: Mapping[str, str] | Sequence[str] | None = None) -> list[Cell]:
  """{row: [results.json dicts over seeds]} -> cells, in row order.

  Metrics per row: `metric` (a name, or several comma-separated) if given; else the row's main
  metric, then any other metric the paper dict names for that row (e.g. MRPC F1 and accuracy),
  then `extra` ({label: metric path} or paths: the experiment's METRICS columns, left out for a
  row whose runs lack them). units: "auto" (see the module docstring), "raw" or "percent"
  (multiply every metric by 100).
  """
  if units not in ("auto", "raw", "percent"):
    raise ValueError(f"units must be auto, raw or percent, got {units!r}")
  paper = paper or {}
  extra_items = list(extra.items()) if isinstance(extra, Mapping) else [(m, m) for m in extra or ()]
  raw_cells, paths = [], {}
  for row, results in results_by_row.items():
    if not results:
      continue
    asked = _metric_list(metric)
    if asked:
      names = [(m, m, True) for m in asked]
    else:
      main = metric_of(results[0], None, which)[0]
      names = [(main, main, True)]
      names += [(m, m, True) for (r, m) in paper if r == row and m != main]
      names += [(label, path, False) for label, path in extra_items
                if label not in {n for n, _, _ in names}]
    for label, path, primary in names:
      if not primary:
        try:
          values = [metric_of(r, path, which)[1] for r in results]
        except KeyError:
          continue  # a METRICS column this row does not have (e.g. sparsity of a dense run)
      else:
        values = [metric_of(r, path, which)[1] for r in results]
      raw_cells.append((row, label, summarize(values, seed=seed), paper.get((row, label)), primary))
      paths[label] = path
  factors = {}  # one factor per metric, so a column is in one unit and its bars on one axis
  for _, label, raw, _, _ in raw_cells:
    if label in factors:
      continue
    if units != "auto":
      factors[label] = 100.0 if units == "percent" else 1.0
      continue
    mine = [c[2] for c in raw_cells if c[1] == label]
    papers = [c[3] for c in raw_cells if c[1] == label]
    in_range = all(abs(v) <= 1.0 for r in mine for v in r.values)
    percent_paper = any(p is not None and abs(p) > 1.5 for p in papers)
    named = is_fraction(label) or is_fraction(paths[label])
    factors[label] = 100.0 if in_range and (named or percent_paper) else 1.0
  return [Cell(row=row, metric=label, summary=scale(raw, factors[label]) if factors[label] != 1
               else raw, paper=ref, scale=factors[label], primary=primary)
          for row, label, raw, ref, primary in raw_cells]
