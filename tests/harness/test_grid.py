"""The grid runner: planning, resume after a kill without redoing finished runs, the table CLI."""

import argparse
import json
import pathlib
import textwrap

import pytest

from jaxft import config as config_lib
from jaxft.harness import cli as harness_cli
from jaxft.harness import grid

EXPERIMENT = textwrap.dedent('''
    """A two-row test grid."""
    from jaxft.config import base_config

    GRID = {"small": "8", "large": "16"}
    PAPER = {("small", "accuracy"): 80.0}
    SEARCH = {"train.learning_rate": ("log_uniform", 1e-5, 1e-3),
              "train.batch_size": ("choice", [8, 16])}

    def get_config(arg=None):
      c = base_config()
      c.data.name = "mr"
      c.train.batch_size = int(arg or 8)
      return c
''')


@pytest.fixture
def experiment(tmp_path):
  path = tmp_path / "toy.py"
  path.write_text(EXPERIMENT)
  return path


class FakeRun:
  """Stands in for train_and_evaluate: writes config.json first (as the loop does), then metrics
  and results; `kill_at` raises KeyboardInterrupt inside that call, after config.json exists."""

  def __init__(self, kill_at=None):
    self.calls = []
    self.kill_at = kill_at

  def __call__(self, config, workdir):
    wd = pathlib.Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "config.json").write_text(config_lib.to_json(config))
    self.calls.append(f"{wd.parent.name}/{wd.name}")
    if self.kill_at is not None and len(self.calls) == self.kill_at:
      raise KeyboardInterrupt("killed")
    acc = 0.5 + 0.01 * config.seed + 0.001 * config.train.batch_size
    with open(wd / "metrics.jsonl", "a") as f:
      for step in (1, 2, 3, 4):
        f.write(json.dumps({"kind": "train", "step": step, "time": 0.0, "loss": 1.0 / step}) + "\n")
      f.write(json.dumps({"kind": "eval", "step": 4, "time": 0.0, "eval/accuracy": acc}) + "\n")
    results = {"experiment": config.experiment, "seed": config.seed, "main_metric": "accuracy",
               "eval": {"accuracy": acc}, "best": {"accuracy": acc}}
    (wd / "results.json").write_text(json.dumps(results))
    return results


def test_plan_names_workdirs_and_sets_seeds(experiment, tmp_path):
  module = grid.load_module(experiment)
  rows = grid.select_rows(grid.grid_of(module, experiment), ["large"])
  runs = grid.plan(experiment, rows, grid.parse_seeds("0,2"), tmp_path / "root",
                   [("train.num_steps", "5")])
  assert [r.workdir for r in runs] == [tmp_path / "root/large/seed0", tmp_path / "root/large/seed2"]
  cfg = runs[1].config()
  assert cfg.seed == 2 and cfg.train.batch_size == 16 and cfg.train.num_steps == 5
  assert cfg.experiment == f"{experiment}:16"
  assert runs[0].cli_args()[-2:] == ["--config.train.num_steps=5", "--config.seed=0"]
  assert grid.parse_seeds("3") == [0, 1, 2]
  with pytest.raises(KeyError, match="unknown rows"):
    grid.select_rows(grid.grid_of(module, experiment), ["huge"])
  with pytest.raises(ValueError, match="--seeds"):
    grid.parse_seeds("two")
  with pytest.raises(ValueError, match="set per run"):
    grid.plan(experiment, rows, [0], tmp_path, [("seed", "3")])


def test_killed_grid_resumes_without_redoing_finished_runs(experiment, tmp_path):
  module = grid.load_module(experiment)
  runs = grid.plan(experiment, grid.grid_of(module, experiment), [0, 1, 2], tmp_path)
  assert len(runs) == 6
  first = FakeRun(kill_at=4)
  with pytest.raises(KeyboardInterrupt):
    grid.run_grid(runs, run_fn=first)
  assert first.calls == ["small/seed0", "small/seed1", "small/seed2", "large/seed0"]
  assert [r.status() for r in runs] == ["done"] * 3 + ["partial", "new", "new"]

  second = FakeRun()
  out = grid.run_grid(runs, run_fn=second)
  # only the killed run (resumed on its own workdir) and the two never started ones run again
  assert second.calls == ["large/seed0", "large/seed1", "large/seed2"]
  assert [r["seed"] for r in out["small"]] == [0, 1, 2]
  assert [r["eval"]["accuracy"] for r in out["large"]] == pytest.approx([0.516, 0.526, 0.536])

  third = FakeRun()
  grid.run_grid(runs, run_fn=third)
  assert third.calls == []


def test_keep_going_reports_failures_and_continues(experiment, tmp_path):
  module = grid.load_module(experiment)
  runs = grid.plan(experiment, grid.grid_of(module, experiment), [0], tmp_path)
  calls = []

  def flaky(config, workdir):
    calls.append(config.train.batch_size)
    if config.train.batch_size == 8:
      raise RuntimeError("out of memory")
    return FakeRun()(config, workdir)

  out = grid.run_grid(runs, run_fn=flaky, keep_going=True)
  assert calls == [8, 16] and out["small"] == [] and len(out["large"]) == 1
  with pytest.raises(RuntimeError, match="out of memory"):
    grid.run_grid(runs, run_fn=flaky)


def test_table_cli_writes_tables_and_plots(experiment, tmp_path, monkeypatch, capsys):
  root = tmp_path / "root"
  fake = FakeRun()
  monkeypatch.setattr(grid, "default_run_fn", fake)
  args = argparse.Namespace(experiment=str(experiment))
  rc = harness_cli.main(args, ["--seeds", "2", "--workdir-root", str(root),
                               "--config.train.num_steps=3"])
  assert rc == 0 and len(fake.calls) == 4
  for name in ("table.md", "table.tex", "table.csv", "curves.png", "bars.png"):
    assert (root / name).stat().st_size > 0, name
  assert (root / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  md = (root / "table.md").read_text()
  small = [l for l in md.splitlines() if l.startswith("| small")][0]
  # seeds 0, 1 at batch 8: 0.508, 0.518 -> x100 (paper in percent): 51.30 +/- 0.71, diff -28.70
  assert "51.30 ± 0.71" in small and "80.00" in small and "-28.70" in small
  cfg = json.loads((root / "large/seed1/config.json").read_text())
  assert cfg["train"]["num_steps"] == 3 and cfg["seed"] == 1

  capsys.readouterr()
  assert harness_cli.main(args, ["--seeds", "3", "--workdir-root", str(root), "--dry-run"]) == 0
  listing = capsys.readouterr().out.splitlines()
  assert [l.split()[0] for l in listing] == ["done", "done", "new", "done", "done", "new"]
  assert len(fake.calls) == 4


def test_cli_rejects_bad_override_before_running(experiment, tmp_path, monkeypatch):
  fake = FakeRun()
  monkeypatch.setattr(grid, "default_run_fn", fake)
  args = argparse.Namespace(experiment=str(experiment))
  with pytest.raises(KeyError, match="learning_rat"):
    harness_cli.main(args, ["--workdir-root", str(tmp_path), "--config.train.learning_rat=1"])
  assert fake.calls == []
