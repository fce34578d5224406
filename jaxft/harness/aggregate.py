"""Seeds -> numbers: mean, sample sd and a bootstrap interval per (row, metric), from workdirs.

For values x_1..x_n of one metric over n seeds:
  mean = sum(x) / n,  sd = sqrt(sum((x - mean)^2) / (n - 1))  (sample sd, ddof=1; nan when n = 1),
  95% bootstrap interval (Efron & Tibshirani 1993, percentile method): draw B = 10,000 resamples of
  size n with replacement from a seeded generator, take each resample's mean, report the 2.5th and
  97.5th percentiles of those means. The generator is seeded so a table is reproducible bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Iterable, Sequence

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
  """<workdir>/results.json as a dict, or None if the run has not finished."""
  path = pathlib.Path(workdir) / "results.json"
  if not path.is_file():
    return None
  return json.loads(path.read_text())


def metric_of(results: dict, metric: str | None = None, which: str = "eval") -> tuple[str, float]:
  """(name, value) of `metric` (default: the run's main_metric) from results[which].

  which: "eval" (metrics at the end of training) or "best" (at the best eval by the main metric).
  """
  if which not in ("eval", "best"):
    raise ValueError(f"which must be 'eval' or 'best', got {which!r}")
  name = metric or results.get("main_metric")
  block = results.get(which) or {}
  if name not in block:
    raise KeyError(f"metric {name!r} not in results[{which!r}] of {results.get('experiment')!r} "
                   f"seed {results.get('seed')}; it has {sorted(block)}. Pass --metric with one of them")
  return name, float(block[name])


@dataclasses.dataclass
class Cell:
  """A table row's numbers for one metric, with the paper's value when the experiment gives one."""

  row: str
  metric: str
  summary: Summary
  paper: float | None = None
  scale: float = 1.0  # what our raw values were multiplied by to match the paper's units

  @property
  def diff(self) -> float | None:
    return None if self.paper is None else self.summary.mean - self.paper


def auto_scale(raws: Sequence[Summary], papers: Sequence[float | None]) -> float:
  """100 when the paper reports percent (some |paper| > 1.5) and all our values are fractions
  (every |x| <= 1), else 1. Papers write accuracy 92.23 where jaxft's metrics are 0.9223; one
  factor for the whole table keeps rows comparable and the bars on one axis."""
  if not any(p is not None and abs(p) > 1.5 for p in papers):
    return 1.0
  if all(abs(v) <= 1.0 for r in raws for v in r.values):
    return 100.0
  return 1.0


def build_cells(results_by_row: dict[str, list[dict]], paper: dict | None = None,
                metric: str | None = None, which: str = "eval", units: str = "auto",
                seed: int = BOOTSTRAP_SEED) -> list[Cell]:
  """{row: [results.json dicts over seeds]} -> cells, in row order.

  Metrics per row: `metric` if given; else the row's main metric, then any other metric the paper
  dict names for that row (e.g. MRPC F1 and accuracy). units: "auto" (see auto_scale), "raw" or
  "percent" (multiply by 100).
  """
  if units not in ("auto", "raw", "percent"):
    raise ValueError(f"units must be auto, raw or percent, got {units!r}")
  paper = paper or {}
  raw_cells = []
  for row, results in results_by_row.items():
    if not results:
      continue
    if metric:
      names = [metric]
    else:
      names = [metric_of(results[0], None, which)[0]]
      names += [m for (r, m) in paper if r == row and m not in names]
    for name in names:
      values = [metric_of(r, name, which)[1] for r in results]
      raw_cells.append((row, name, summarize(values, seed=seed), paper.get((row, name))))
  factor = {"raw": 1.0, "percent": 100.0}.get(units)
  if factor is None:
    factor = auto_scale([c[2] for c in raw_cells], [c[3] for c in raw_cells])
  return [Cell(row=row, metric=name, summary=scale(raw, factor) if factor != 1 else raw,
               paper=ref, scale=factor) for row, name, raw, ref in raw_cells]
