"""Cells -> Markdown, LaTeX (booktabs) and CSV tables: ours (mean +/- sd, 95% CI) beside the paper.

Columns: row, metric, n (seeds), mean +/- sd, 95% bootstrap CI, paper, diff (ours - paper).
The wide form (table_wide.md) has a line per row and a column per metric (mean +/- sd), with a
"paper" column beside each metric the paper reports, as papers print their tables.
Numbers are shown with `digits` decimals; the CSV keeps full precision for further analysis.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import pathlib
from typing import Sequence

from jaxft.harness.aggregate import Cell

HEADER = ("row", "metric", "n", "mean ± sd", "95% CI", "paper", "diff")


def _f(x: float | None, digits: int, count: bool = False) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "–"
  text = f"{x:,.0f}" if count else f"{x:.{digits}f}"
  return text[1:] if text.startswith("-") and not text.strip("-0.,") else text  # -0.00 -> 0.00


def _signed(x: float | None, digits: int) -> str:
  return "–" if x is None else f"{x:+.{digits}f}"


def _cells_text(c: Cell, digits: int) -> list[str]:
  s = c.summary
  # Counts (parameters, steps) read as 22,713,986 rather than 22713986.00.
  count = s.n > 0 and abs(s.mean) >= 1000 and all(float(v).is_integer() for v in s.values)
  f = functools.partial(_f, digits=digits, count=count)
  mean_sd = f(s.mean) + ("" if s.n < 2 else f" ± {f(s.sd)}")
  ci = f"[{f(s.ci_low)}, {f(s.ci_high)}]"
  return [c.row, _metric_label(c), str(s.n), mean_sd, ci, _f(c.paper, digits),
          _signed(c.diff, digits)]


def markdown(cells: Sequence[Cell], digits: int = 2, title: str | None = None) -> str:
  lines = [f"### {title}", ""] if title else []
  lines.append("| " + " | ".join(HEADER) + " |")
  lines.append("| " + " | ".join(["---"] * 2 + ["---:"] * (len(HEADER) - 2)) + " |")
  for c in cells:
    lines.append("| " + " | ".join(_cells_text(c, digits)) + " |")
  return "\n".join(lines) + "\n"


def _metric_label(c: Cell) -> str:
  return c.metric + (" (×100)" if c.scale == 100 else "")


def wide_markdown(cells: Sequence[Cell], digits: int = 2, title: str | None = None) -> str:
  """A line per row, a column per metric (first-seen order); "–" where a row lacks the metric."""
  rows = list(dict.fromkeys(c.row for c in cells))
  metrics = list(dict.fromkeys(_metric_label(c) for c in cells))
  by_key = {(c.row, _metric_label(c)): c for c in cells}
  with_paper = {m for (_, m), c in by_key.items() if c.paper is not None}
  header = ["row"]
  for m in metrics:
    header += [m] + ([f"paper: {m}"] if m in with_paper else [])
  lines = [f"### {title}", ""] if title else []
  lines.append("| " + " | ".join(header) + " |")
  lines.append("| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |")
  for row in rows:
    out = [row]
    for m in metrics:
      c = by_key.get((row, m))
      out.append("–" if c is None else _cells_text(c, digits)[3])
      if m in with_paper:
        out.append(_f(None if c is None else c.paper, digits))
    lines.append("| " + " | ".join(out) + " |")
  return "\n".join(lines) + "\n"


def _tex_escape(text: str) -> str:
  text = text.replace("\\", "\0")  # placeholder, so the braces added below stay unescaped
  for ch in "&%_#${}":
    text = text.replace(ch, "\\" + ch)
  return text.replace("\0", r"\textbackslash{}")


def latex(cells: Sequence[Cell], digits: int = 2, caption: str | None = None,
          label: str | None = None) -> str:
  """A booktabs table; mean $\\pm$ sd, CI in brackets."""
  out = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{llrrrrr}", r"\toprule",
         r"Row & Metric & $n$ & Mean $\pm$ sd & 95\% CI & Paper & Diff \\", r"\midrule"]
  for c in cells:
    _, _, n, mean_sd, ci, paper, diff = (t.replace("–", "--") for t in _cells_text(c, digits))
    mean_sd = mean_sd.replace(" ± ", r" $\pm$ ")
    metric = _tex_escape(c.metric) + (r" ($\times$100)" if c.scale == 100 else "")
    out.append(f"{_tex_escape(c.row)} & {metric} & {n} & {mean_sd} & {ci} & {paper} & {diff} \\\\")
  out += [r"\bottomrule", r"\end{tabular}"]
  if caption:
    out.append(rf"\caption{{{_tex_escape(caption)}}}")
  if label:
    out.append(rf"\label{{{label}}}")
  out.append(r"\end{table}")
  return "\n".join(out) + "\n"


CSV_FIELDS = ("row", "metric", "n", "mean", "sd", "ci_low", "ci_high", "paper", "diff", "scale",
              "values")


def csv_text(cells: Sequence[Cell]) -> str:
  """Full precision; `values` holds the per-seed numbers joined by ';'."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(CSV_FIELDS)
  for c in cells:
    s = c.summary
    w.writerow([c.row, c.metric, s.n, repr(s.mean), repr(s.sd), repr(s.ci_low), repr(s.ci_high),
                "" if c.paper is None else repr(c.paper), "" if c.diff is None else repr(c.diff),
                c.scale, ";".join(repr(v) for v in s.values)])
  return buf.getvalue()


def write_all(cells: Sequence[Cell], root: str | pathlib.Path, title: str | None = None,
              digits: int = 2) -> dict[str, pathlib.Path]:
  """Writes <root>/table.md, table_wide.md, table.tex, table.csv; returns their paths."""
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  paths = {"md": root / "table.md", "wide": root / "table_wide.md", "tex": root / "table.tex",
           "csv": root / "table.csv"}
  paths["md"].write_text(markdown(cells, digits, title))
  paths["wide"].write_text(wide_markdown(cells, digits, title))
  paths["tex"].write_text(latex(cells, digits, caption=title))
  paths["csv"].write_text(csv_text(cells))
  return paths
