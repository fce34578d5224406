"""Figures of a grid: learning curves per row (from metrics.jsonl) and a bar chart with error bars.

matplotlib with the Agg backend (files only, no display). curves.png: one column per row of the
table; top panel the training loss, bottom panel the eval metric, one thin line per seed and their
mean (over the steps all seeds logged) in bold. bars.png: mean +/- sd per (row, metric), the
paper's value as a black tick.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Sequence

import numpy as np

from jaxft.harness.aggregate import Cell


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def read_curves(workdir: str | pathlib.Path, metric: str | None = None
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """metrics.jsonl -> {"loss": (steps, values), "eval/<metric>": (steps, values)}.

  metric: the eval metric to read (without the "eval/" prefix); default the run's main metric from
  results.json, else the first eval/ key seen. A resumed run may have logged a step twice (the
  steps after its last checkpoint); the later row wins.
  """
  workdir = pathlib.Path(workdir)
  path = workdir / "metrics.jsonl"
  if not path.is_file():
    return {}
  if metric is None and (workdir / "results.json").is_file():
    metric = json.loads((workdir / "results.json").read_text()).get("main_metric")
  train, evals = {}, {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      row = json.loads(line)
      if row.get("kind") == "train" and "loss" in row:
        train[int(row["step"])] = float(row["loss"])
      elif row.get("kind") == "eval":
        if metric is None:
          metric = next((k[5:] for k in row if k.startswith("eval/")), None)
        key = f"eval/{metric}"
        if key in row:
          evals[int(row["step"])] = float(row[key])
  out = {}
  if train:
    s = np.array(sorted(train))
    out["loss"] = (s, np.array([train[k] for k in s]))
  if evals:
    s = np.array(sorted(evals))
    out[f"eval/{metric}"] = (s, np.array([evals[k] for k in s]))
  return out


def _mean_curve(curves: list[tuple[np.ndarray, np.ndarray]]):
  common = set(curves[0][0].tolist())
  for s, _ in curves[1:]:
    common &= set(s.tolist())
  if not common:
    return None
  steps = np.array(sorted(common))
  vals = np.mean([[dict(zip(s.tolist(), v.tolist()))[k] for k in steps] for s, v in curves], axis=0)
  return steps, vals


def learning_curves(workdirs_by_row: dict[str, Sequence[pathlib.Path]], out: str | pathlib.Path,
                    metric: str | None = None) -> pathlib.Path | None:
  """Writes curves.png; returns its path, or None when no run has logged anything yet."""
  data = {row: [read_curves(w, metric) for w in wds] for row, wds in workdirs_by_row.items()}
  data = {row: [c for c in cs if c] for row, cs in data.items()}
  data = {row: cs for row, cs in data.items() if cs}
  if not data:
    return None
  plt = _pyplot()
  n = len(data)
  fig, axes = plt.subplots(2, n, figsize=(3.2 * n + 0.6, 5.6), squeeze=False)
  for j, (row, runs) in enumerate(data.items()):
    for i, kind in enumerate(("loss", "eval")):
      ax = axes[i][j]
      series = []
      label = None
      for run in runs:
        key = "loss" if kind == "loss" else next((k for k in run if k.startswith("eval/")), None)
        if key is None or key not in run:
          continue
        label = key
        s, v = run[key]
        series.append((s, v))
        ax.plot(s, v, lw=0.8, alpha=0.45, marker="o" if len(s) < 3 else None, ms=3)
      if series:
        mean = _mean_curve(series)
        if mean is not None and len(series) > 1:
          ax.plot(*mean, lw=2.0, color="black", label="mean")
          ax.legend(fontsize=7)
      ax.set_title(f"{row}: {label or kind}", fontsize=9)
      ax.set_xlabel("step", fontsize=8)
      ax.tick_params(labelsize=7)
      ax.grid(alpha=0.3)
  fig.tight_layout()
  out = pathlib.Path(out)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def bar_chart(cells: Sequence[Cell], out: str | pathlib.Path) -> pathlib.Path | None:
  """Writes bars.png: mean with sd error bars (none for one seed), paper values as black ticks."""
  if not cells:
    return None
  plt = _pyplot()
  x = np.arange(len(cells))
  means = [c.summary.mean for c in cells]
  errs = [0.0 if math.isnan(c.summary.sd) else c.summary.sd for c in cells]
  fig, ax = plt.subplots(figsize=(max(4.0, 1.0 * len(cells) + 1.5), 3.6))
  ax.bar(x, means, yerr=errs, capsize=4, color="#4C72B0", alpha=0.85, label="jaxft (mean ± sd)")
  papers = [(i, c.paper) for i, c in enumerate(cells) if c.paper is not None]
  if papers:
    ax.scatter([i for i, _ in papers], [p for _, p in papers], marker="_", s=600, color="black",
               linewidths=2, label="paper", zorder=3)
  ax.set_xticks(x)
  ax.set_xticklabels([f"{c.row}\n{c.metric}" for c in cells], fontsize=8)
  lo = min(min(means), *(p for _, p in papers)) if papers else min(means)
  hi = max(max(m + e for m, e in zip(means, errs)), *(p for _, p in papers)) if papers else max(
      m + e for m, e in zip(means, errs))
  if lo > 0:  # zoom on the interesting range instead of starting every bar at 0
    span = max(hi - lo, 1e-6)
    ax.set_ylim(max(0.0, lo - 0.5 * span - 0.05 * abs(hi)), hi + 0.25 * span)
  ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  out = pathlib.Path(out)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out
