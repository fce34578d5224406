"""Every experiment file in experiments/: its grids load in the harness's format, every row of
every grid gives a valid config, PAPER names real rows, and the first row of its "cpu" grid
trains for a few steps through the grid runner (a tiny random BERT in place of the real model),
its results tabulated with the file's PAPER and METRICS."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest

from jaxft.harness import aggregate, grid, tables
from jaxft.harness import cli as harness_cli

from tests.harness.tiny_runs import TINY

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[2] / "experiments"
FILES = sorted(p.name for p in EXPERIMENTS.glob("*.py"))
STEPS = 3
# Beside the tiny settings: what the first cpu row of a file needs to fit them (rows that train
# stage after stage, and labels per class that 64 training examples can hold).
EXTRA = {
    "continual_glue.py": {"continual.steps_per_task": 1, "train.num_steps": 0},
    "semisup_usb.py": {"data.labeled_per_class": 8},
}


def test_every_experiment_file_is_listed():
  assert len(FILES) >= 10 and "quickstart.py" in FILES and "glue_small.py" in FILES


@pytest.mark.parametrize("name", FILES)
def test_grids_plan_and_the_first_cpu_row_trains(name, tiny_bert_dir, xla_cache, tmp_path):
  path = EXPERIMENTS / name
  module = grid.load_module(path)
  grids = grid.grids_of(module, path)
  assert list(grids)[:2] == ["paper", "cpu"], "convention: a paper-sized grid, then a CPU-sized one"
  for grid_name, rows in grids.items():
    for run in grid.plan(path, rows, [0], tmp_path / grid_name):
      config = run.config()  # every row of every grid is a valid, locked config
      assert config.seed == 0 and config.data.data_dir == ""  # data from the data root
  rows = {row for g in grids.values() for row in g}
  assert {row for row, _ in getattr(module, "PAPER", {})} <= rows
  doc = module.__doc__ or ""
  assert "jaxft table experiments/" + name in doc and "--grid cpu" in doc

  first, row = next(iter(grids["cpu"].items()))
  if row.evaluate:  # the row's evaluation, shrunk: PGD-1 on one batch (synonym swaps: tests/eval)
    small = {**row.evaluate, "pgd_steps": 1, "pgd_examples": 8, "pgd_eps": (1.0,),
             "synonym_examples": 0}
    row = dataclasses.replace(row, evaluate=small)
  values = {"model.name": tiny_bert_dir, **TINY, "train.num_steps": STEPS, **EXTRA.get(name, {})}
  root = tmp_path / "runs"
  runs = grid.plan(path, {first: row}, [0], root,
                   [(k, grid.override_text(v)) for k, v in values.items()])
  grid.run_grid(runs)
  cells = aggregate.build_cells(grid.collect(runs), getattr(module, "PAPER", None),
                                extra=harness_cli.metrics_of(module, "cpu"))
  results = json.loads((root / first / "seed0" / "results.json").read_text())
  assert results["seed"] == 0 and cells and cells[0].row == first and cells[0].summary.n == 1
  assert f"| {first} |" in tables.markdown(cells)
  if row.evaluate:
    assert "robustness" in json.loads(runs[0].eval_file().read_text())
