"""Aggregation: mean / sample sd / bootstrap CI against numpy and scipy; tables in three formats."""

import csv
import io
import json
import math

import numpy as np
import pytest
import scipy.stats

from jaxft.harness import aggregate, tables

VALUES = [0.91, 0.93, 0.92, 0.95, 0.90]


def test_summary_matches_numpy_and_scipy():
  s = aggregate.summarize(VALUES)
  assert s.n == 5
  assert s.mean == pytest.approx(np.mean(VALUES), abs=1e-15)
  assert s.sd == pytest.approx(np.std(VALUES, ddof=1), abs=1e-15)
  # hand: deviations -.012 .008 -.002 .028 -.022 -> squares sum 0.00148 -> /4 -> sd 0.0192353...
  assert s.sd == pytest.approx(math.sqrt(0.00148 / 4), rel=1e-12)
  ref = scipy.stats.bootstrap((np.array(VALUES),), np.mean, confidence_level=0.95,
                              n_resamples=10_000, method="percentile",
                              rng=np.random.default_rng(0), vectorized=True)
  assert s.ci_low == pytest.approx(ref.confidence_interval.low, abs=1e-12)
  assert s.ci_high == pytest.approx(ref.confidence_interval.high, abs=1e-12)
  assert s.ci_low <= s.mean <= s.ci_high


def test_bootstrap_is_seeded_and_collapses_for_constant_values():
  assert aggregate.bootstrap_ci(VALUES) == aggregate.bootstrap_ci(VALUES)
  assert aggregate.bootstrap_ci(VALUES, seed=1) != aggregate.bootstrap_ci(VALUES, seed=0)
  assert aggregate.bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
  one = aggregate.summarize([0.7])
  assert one.n == 1 and math.isnan(one.sd) and (one.ci_low, one.ci_high) == (0.7, 0.7)


def test_bad_values_fail_clearly():
  with pytest.raises(ValueError, match="no values"):
    aggregate.summarize([])
  with pytest.raises(ValueError, match="non-finite"):
    aggregate.summarize([0.5, float("nan")])


def _results(seed, acc, f1):
  return {"experiment": "x", "seed": seed, "main_metric": "accuracy",
          "eval": {"accuracy": acc, "f1": f1}, "best": {"accuracy": acc + 0.01, "f1": f1}}


def test_cells_scale_to_percent_and_diff_against_paper():
  rows = {"rte": [_results(0, 0.60, 0.5), _results(1, 0.70, 0.6)],
          "mrpc": [_results(0, 0.80, 0.85), _results(1, 0.84, 0.87)]}
  paper = {("rte", "accuracy"): 64.76, ("mrpc", "f1"): 88.97}
  cells = aggregate.build_cells(rows, paper)
  assert [(c.row, c.metric) for c in cells] == [("rte", "accuracy"), ("mrpc", "accuracy"),
                                                 ("mrpc", "f1")]
  rte = cells[0]
  assert rte.scale == 100 and rte.summary.mean == pytest.approx(65.0)
  assert rte.summary.sd == pytest.approx(100 * np.std([0.6, 0.7], ddof=1))
  assert rte.diff == pytest.approx(65.0 - 64.76)
  # one factor for the whole table: a row without a paper value is in percent too
  assert cells[1].paper is None and cells[1].scale == 100 and cells[1].summary.mean == pytest.approx(82)
  assert cells[2].summary.mean == pytest.approx(86.0) and cells[2].diff == pytest.approx(86 - 88.97)
  best = aggregate.build_cells(rows, paper, which="best", units="raw")
  assert best[0].summary.mean == pytest.approx(0.66)
  loss = {"rte": [{"main_metric": "loss", "eval": {"loss": 1.7}}]}
  assert aggregate.build_cells(loss, {("rte", "loss"): 2.0})[0].scale == 1.0  # not a fraction
  with pytest.raises(KeyError, match="not in results"):
    aggregate.build_cells(rows, metric="mcc")


def test_metric_paths_extra_columns_and_units_per_metric():
  def run(seed, acc, params, sparsity=None, pgd=None):
    r = {"main_metric": "accuracy", "seed": seed, "eval": {"accuracy": acc}, "best": {},
         "trainable_params": params, "last_train": {"step": 9}}
    if sparsity is not None:
      r["last_train"]["sparsity/total"] = sparsity
    if pgd is not None:
      r["eval_validation_best"] = {"robustness": {"pgd": {"pgd_l2/1/accuracy": pgd}}}
    return r

  assert aggregate.lookup({"a": {"pgd_l2/1/accuracy": 0.5}}, "a/pgd_l2/1/accuracy") == 0.5
  assert aggregate.lookup({"a": {"b": 1}}, "a/c") is None
  rows = {"dense": [run(0, 0.80, 1000), run(1, 0.82, 1000)],
          "pruned": [run(0, 0.70, 1000, 0.9, 0.4), run(1, 0.72, 1000, 0.9, 0.5)]}
  extra = {"sparsity": "last_train/sparsity/total", "params": "trainable_params",
           "PGD eps 1": "eval_validation_best/robustness/pgd/pgd_l2/1/accuracy"}
  cells = aggregate.build_cells(rows, extra=extra)
  got = {(c.row, c.metric): c for c in cells}
  # no paper at all: accuracy, sparsity and robust accuracy are still fractions -> percent
  assert got["dense", "accuracy"].summary.mean == pytest.approx(81.0)
  assert got["pruned", "sparsity"].summary.mean == pytest.approx(90.0, rel=1e-6)
  assert got["pruned", "PGD eps 1"].summary.values == pytest.approx((40.0, 50.0))
  assert got["dense", "params"].scale == 1 and got["dense", "params"].summary.mean == 1000
  assert ("dense", "sparsity") not in got  # a column the dense runs lack is left out
  assert [c.primary for c in cells if c.row == "dense"] == [True, False]
  assert aggregate.metric_of(rows["dense"][0], "trainable_params") == ("trainable_params", 1000.0)
  two = aggregate.build_cells(rows, metric="accuracy,trainable_params", units="raw")
  assert [(c.row, c.metric) for c in two][:2] == [("dense", "accuracy"), ("dense", "trainable_params")]
  assert aggregate.is_fraction("entity_f1") and not aggregate.is_fraction("learning_rate")


def test_tables_markdown_latex_csv(tmp_path):
  rows = {"rte_x": [_results(0, 0.60, 0.5), _results(1, 0.70, 0.6)]}
  cells = aggregate.build_cells(rows, {("rte_x", "accuracy"): 64.76})
  md = tables.markdown(cells)
  line = [l for l in md.splitlines() if l.startswith("| rte_x")][0]
  assert "65.00 ± 7.07" in line and "64.76" in line and "+0.24" in line and "| 2 |" in line
  lo, hi = cells[0].summary.ci_low, cells[0].summary.ci_high
  assert f"[{lo:.2f}, {hi:.2f}]" in line
  tex = tables.latex(cells)
  assert r"rte\_x & accuracy ($\times$100) & 2 & 65.00 $\pm$ 7.07" in tex
  assert tex.count(r"\toprule") == 1 and tex.rstrip().endswith(r"\end{table}")
  parsed = list(csv.DictReader(io.StringIO(tables.csv_text(cells))))
  assert float(parsed[0]["mean"]) == cells[0].summary.mean
  assert [float(v) for v in parsed[0]["values"].split(";")] == [60.0, 70.0]
  paths = tables.write_all(cells, tmp_path)
  assert paths["md"].read_text() == tables.markdown(cells)
  assert tables._tex_escape("a_b&c%\\") == r"a\_b\&c\%\textbackslash{}"


def test_wide_markdown_has_a_line_per_row_and_a_column_per_metric(tmp_path):
  rows = {"rte": [_results(0, 0.60, 0.5), _results(1, 0.70, 0.6)],
          "mrpc": [_results(0, 0.80, 0.85)]}
  cells = aggregate.build_cells(rows, {("mrpc", "f1"): 88.97}, metric="accuracy,f1")
  lines = tables.wide_markdown(cells).splitlines()
  assert lines[0] == "| row | accuracy (×100) | f1 (×100) | paper: f1 (×100) |"
  assert lines[1] == "| --- | ---: | ---: | ---: |"
  assert lines[2] == "| rte | 65.00 ± 7.07 | 55.00 ± 7.07 | – |"  # sd only with 2+ seeds
  assert lines[3] == "| mrpc | 80.00 | 85.00 | 88.97 |" and len(lines) == 4
  missing = [c for c in cells if (c.row, c.metric) != ("mrpc", "f1")]
  assert tables.wide_markdown(missing).splitlines()[3] == "| mrpc | 80.00 | – |"
  assert tables.write_all(cells, tmp_path)["wide"].read_text() == tables.wide_markdown(cells)
  params = {"full": [{**_results(0, 0.8, 0.8), "trainable_params": 22713986}]}
  cells = aggregate.build_cells(params, metric="accuracy,trainable_params", units="raw")
  assert tables.wide_markdown(cells).splitlines()[2] == "| full | 0.80 | 22,713,986 |"  # a count
  zero = {"soft": [{**_results(0, 0.8, 0.8), "sparsity": -1e-9}]}  # float noise below zero
  cells = aggregate.build_cells(zero, metric="sparsity", units="raw")
  assert tables.wide_markdown(cells).splitlines()[2] == "| soft | 0.00 |"  # not -0.00


def test_train_quarters_average_each_quarter_of_the_logged_steps(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  lines = [{"kind": "info", "step": 0, "total_steps": 8}]
  for step in range(1, 9):  # a metric logged every step, another only on even steps
    rec = {"kind": "train", "step": step, "time": 1.0, "loss": float(step)}
    if step % 2 == 0:
      rec["unsup/pseudo_label_accuracy"] = step / 10
    lines.append(rec)
  lines.insert(5, {"kind": "train", "step": 3, "time": 2.0, "loss": 3.0})  # resumed: logged twice
  lines.append({"kind": "eval", "step": 8, "eval/accuracy": 0.5})
  (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  (run / "results.json").write_text(json.dumps({"steps": 8, "eval": {"accuracy": 0.5}}))
  r = aggregate.read_results(run)
  assert r["train_mean"]["q1"] == {"loss": 1.5, "unsup/pseudo_label_accuracy": 0.2}
  assert r["train_mean"]["q2"]["loss"] == 3.5
  assert aggregate.lookup(r, "train_mean/q4/unsup/pseudo_label_accuracy") == 0.8
  assert aggregate.metric_of(r, "train_mean/q3/loss") == ("train_mean/q3/loss", 5.5)
