"""Hyperparameter search: spaces, grid / random / TPE trials as workdirs, pruning, best overrides."""

import csv
import json
import math
import pathlib
import sys
import textwrap

import numpy as np
import pytest

from jaxft import config as config_lib
from jaxft.harness import search

SPACE = {"train.learning_rate": ("log_uniform", 1e-5, 1e-3), "train.batch_size": ("choice", [16, 32]),
         "train.warmup_ratio": ("uniform", 0.0, 0.2), "train.num_epochs": ("int", 2, 4)}


@pytest.fixture
def spec(tmp_path):
  path = tmp_path / "exp.py"
  path.write_text(textwrap.dedent('''
      from jaxft.config import base_config
      GRIDS = {"cpu": {"mr": None}}
      def get_config(arg=None):
        return base_config()
  '''))
  return str(path)


def test_space_grid_and_random_values():
  params = search.parse_space(SPACE)
  assert [p.key for p in params] == sorted(SPACE)
  lr = [p for p in params if p.key == "train.learning_rate"][0]
  np.testing.assert_allclose(search.grid_values(lr, 3), [1e-5, 1e-4, 1e-3], rtol=1e-12)
  ep = [p for p in params if p.key == "train.num_epochs"][0]
  assert search.grid_values(ep, 5) == [2, 3, 4]  # 2, 2.5, 3, 3.5, 4 rounded and deduplicated
  assert len(search.grid_trials(params, 3)) == 2 * 3 * 3 * 3
  trials = search.random_trials(params, 50, seed=4)
  assert trials[:5] == search.random_trials(params, 5, seed=4)  # trial k does not depend on count
  for t in trials:
    assert 1e-5 <= t["train.learning_rate"] <= 1e-3 and t["train.batch_size"] in (16, 32)
    assert 0 <= t["train.warmup_ratio"] <= 0.2 and t["train.num_epochs"] in (2, 3, 4)
  logs = np.log10([t["train.learning_rate"] for t in search.random_trials(params, 400, 0)])
  assert abs(np.mean(logs) + 4) < 0.1  # log-uniform: mean exponent halfway between -5 and -3
  for bad, msg in [({"x": ("normal", 0, 1)}, "kind"), ({"x": ("log_uniform", 0, 1)}, "low > 0"),
                   ({"x": ("uniform", 2, 1)}, "below"), ({"x": ("choice", [])}, "non-empty"),
                   ({}, "empty")]:
    with pytest.raises(ValueError, match=msg):
      search.parse_space(bad)


def test_override_line_round_trips_through_config():
  values = {"train.learning_rate": 3.0000000000000004e-05, "train.batch_size": 16,
            "model.remat": True, "train.schedule": "cosine"}
  line = search.overrides_line(values)
  assert line.startswith("--config.model.remat=true --config.train.batch_size=16")
  cfg = config_lib.base_config()
  for key, value in config_lib.parse_overrides(line.split()):
    config_lib.apply_override(cfg, key, value)
  assert cfg.train.learning_rate == 3.0000000000000004e-05 and cfg.train.batch_size == 16
  assert cfg.model.remat is True and cfg.train.schedule == "cosine"


def _fake_run(calls):
  def run(config, workdir):
    wd = pathlib.Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "config.json").write_text(config_lib.to_json(config))
    calls.append(wd.name)
    # best at lr = 1e-4 and batch 16
    acc = 0.9 - (math.log10(config.train.learning_rate) + 4) ** 2 * 0.1 \
        - 0.05 * (config.train.batch_size == 32)
    res = {"main_metric": "accuracy", "seed": config.seed, "eval": {"accuracy": acc},
           "best": {"accuracy": acc}}
    (wd / "results.json").write_text(json.dumps(res))
    return res
  return run


def test_grid_search_picks_the_best_and_writes_a_runnable_line(spec, tmp_path):
  space = {"train.learning_rate": ("log_uniform", 1e-5, 1e-3), "train.batch_size": ("choice", [16, 32])}
  calls = []
  root = tmp_path / "search"
  trials, best = search.search("mr", spec, space, root, strategy="grid", points=3,
                               metric="accuracy", overrides=[("train.num_steps", "7")],
                               run_fn=_fake_run(calls))
  assert len(calls) == 6 and best.values == {"train.learning_rate": pytest.approx(1e-4),
                                             "train.batch_size": 16}
  line = (root / "best_overrides.txt").read_text().strip()
  assert line == ("--config.train.num_steps=7 " + search.overrides_line(best.values))
  cfg = config_lib.load(spec, config_lib.parse_overrides(line.split()))
  assert cfg.train.batch_size == 16 and cfg.train.num_steps == 7
  assert cfg.train.learning_rate == pytest.approx(1e-4)
  rows = list(csv.DictReader(open(root / "trials.csv")))
  assert [r["rank"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
  assert float(rows[0]["accuracy"]) == pytest.approx(0.9)
  assert json.loads((root / f"trial{best.number}" / "config.json").read_text())["train"][
      "batch_size"] == 16
  # every trial is an ordinary, resumable workdir: a second search reruns nothing
  search.search("mr", spec, space, root, strategy="grid", points=3, metric="accuracy",
                overrides=[("train.num_steps", "7")], run_fn=_fake_run(calls))
  assert len(calls) == 6
  with pytest.raises(ValueError, match="also searched"):
    search.search("mr", spec, space, root, overrides=[("train.batch_size", "8")], metric="accuracy")


def test_random_and_bayes_searches_resume(spec, tmp_path):
  calls = []
  space = {"train.learning_rate": ("log_uniform", 1e-5, 1e-3)}
  _, best = search.search("mr", spec, space, tmp_path / "r", strategy="random", trials=5,
                          metric="accuracy", run_fn=_fake_run(calls))
  assert len(calls) == 5
  draws = search.random_trials(search.parse_space(space), 5, 0)
  assert best.values == max(draws, key=lambda v: -(math.log10(v["train.learning_rate"]) + 4) ** 2)

  calls.clear()
  trials, best = search.search("mr", spec, space, tmp_path / "b", strategy="bayes", trials=6,
                               metric="accuracy", prune=False, run_fn=_fake_run(calls))
  assert len(calls) == 6 and all(t.state == "complete" for t in trials)
  assert best.value == max(t.value for t in trials)
  trials, _ = search.search("mr", spec, space, tmp_path / "b", strategy="bayes", trials=8,
                            metric="accuracy", prune=False, run_fn=_fake_run(calls))
  assert len(calls) == 8 and len(trials) == 8  # the study in study.db continued


FAKE_TRAIN = textwrap.dedent('''
    import json, pathlib, sys, time
    args = sys.argv[1:]
    wd = pathlib.Path(args[args.index("--workdir") + 1])
    k = int(wd.name[len("trial"):])
    wd.mkdir(parents=True, exist_ok=True)
    for step in range(1, 6):
      value = (1.0 - 0.1 * k) * step / 5  # each trial worse than every earlier one
      with open(wd / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "eval", "step": step, "time": 0, "eval/accuracy": value}) + "\\n")
      time.sleep(0.15)
    (wd / "results.json").write_text(json.dumps({"main_metric": "accuracy", "eval": {"accuracy": value},
                                                 "best": {"accuracy": value}}))
''')


def test_bayes_with_median_pruning_stops_bad_trials(spec, tmp_path):
  script = tmp_path / "fake_train.py"
  script.write_text(FAKE_TRAIN)
  command = lambda run: [sys.executable, str(script), *run.cli_args()]
  root = tmp_path / "p"
  trials, best = search.search("mr", spec, {"train.learning_rate": ("log_uniform", 1e-5, 1e-3)},
                               root, strategy="bayes", trials=4, metric="accuracy", prune=True,
                               command=command, poll_s=0.05)
  states = [t.state for t in trials]
  # MedianPruner(n_startup_trials=2): trials 0, 1 complete; 2, 3 are below the median at step 1
  assert states == ["complete", "complete", "pruned", "pruned"], states
  for t in trials[2:]:
    assert (t.run.workdir / "pruned.json").is_file() and not (t.run.workdir / "results.json").exists()
    assert t.run.status() == "pruned"
  assert best.number == 0 and best.value == pytest.approx(1.0)
  assert (root / "best_overrides.txt").read_text().startswith("--config.train.learning_rate=")


def test_run_watched_reports_a_failed_process(tmp_path):
  from jaxft.harness.grid import Run
  run = Run("mr", 0, "x.py", [], tmp_path / "trial0")
  with pytest.raises(RuntimeError, match="failed"):
    search.run_watched(run, lambda v, s: False, "accuracy",
                       command=lambda r: [sys.executable, "-c", "raise SystemExit(3)"], poll_s=0.05)
