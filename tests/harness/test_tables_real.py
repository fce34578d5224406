"""`jaxft table` end to end on real tiny trainings: a tiny BERT teacher and a student distilled from
its exported checkpoint (then attacked with PGD), 2 seeds each, 12 steps of 8 movie reviews.

The first `jaxft table` runs as a process and is killed (SIGKILL) in the middle of the last run;
the same command again trains only that run, resuming it from its newest checkpoint, and writes
the tables and plots; a third call trains nothing.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from jaxft.harness import cli as harness_cli
from jaxft.harness import grid

from tests.harness.tiny_runs import TINY

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = 12

TOY = textwrap.dedent('''
    """Harness test grid: a tiny teacher, then a student distilled from its export."""
    from jaxft.config import base_config, movie_reviews_cpu
    from jaxft.harness.grid import From, Row

    GRIDS = {
        "paper": {"teacher": None},
        "cpu": {
            "teacher": None,
            "student": Row("student", {"distill.teacher": From("teacher", "export")},
                           evaluate={"pgd_eps": (1.0,), "pgd_steps": 1, "pgd_examples": 8}),
        },
    }
    PAPER = {("teacher", "accuracy"): 55.0}
    METRICS = {"cpu": {"PGD eps 1 accuracy":
                       "eval_validation_best/robustness/pgd/pgd_l2/1/accuracy"}}


    def get_config(arg=None):  # the sizes come from the command line (conftest.TINY)
      c = movie_reviews_cpu(base_config())
      c.train.num_steps, c.train.checkpoint_every, c.train.keep_checkpoints = %d, 2, 2
      if arg == "student":
        c.distill.alpha, c.distill.temperature = 0.5, 2.0
      return c
''' % STEPS)


def train_steps(workdir) -> list[int]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  steps = []
  for line in path.read_text().splitlines() if path.is_file() else []:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # being written
      continue
    if row.get("kind") == "train":
      steps.append(row["step"])
  return steps


def committed(workdir) -> list[int]:
  latest = pathlib.Path(workdir) / "checkpoints" / "latest"
  return sorted(int(p.name) for p in latest.glob("*") if p.name.isdigit())


def kill_mid_run(argv, workdir, log_path) -> int:
  """Runs `python -m jaxft <argv>` and SIGKILLs it once `workdir` has trained 3 steps and
  committed a checkpoint; returns the newest committed step."""
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  with open(log_path, "w") as log:
    proc = subprocess.Popen([sys.executable, "-m", "jaxft", *argv], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
  t0 = time.time()
  while not (len(train_steps(workdir)) >= 3 and committed(workdir)):
    if proc.poll() is not None or time.time() - t0 > 240:
      proc.kill()
      raise AssertionError(f"exit {proc.returncode} before the last run got going:\n"
                           f"{pathlib.Path(log_path).read_text()[-4000:]}")
    time.sleep(0.002)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return max(committed(workdir))


def test_table_of_real_runs_reuses_finished_ones_and_restarts_a_killed_one(
    tiny_bert_dir, xla_cache, tmp_path, monkeypatch, caplog):
  experiment = tmp_path / "toy.py"
  experiment.write_text(TOY)
  root = tmp_path / "root"
  flags = ["--grid", "cpu", "--seeds", "2", "--workdir-root", str(root),
           f"--config.model.name={tiny_bert_dir}",
           *[f"--config.{k}={grid.override_text(v)}" for k, v in TINY.items()]]
  last = root / "student" / "seed1"

  newest = kill_mid_run(["table", str(experiment), *flags], last, tmp_path / "killed.txt")
  finished = {r: root / r / "results.json" for r in ("teacher/seed0", "teacher/seed1",
                                                      "student/seed0")}
  assert all(p.is_file() for p in finished.values()) and not (last / "results.json").exists()
  assert (root / "teacher/seed1/export/config.json").is_file()  # the student's teacher
  assert (root / "student/seed0/eval_validation_best.json").is_file()
  assert not (root / "table.md").exists()
  mtimes = {r: p.stat().st_mtime_ns for r, p in finished.items()}

  calls = []
  real_run = grid.default_run_fn

  def counting(config, workdir):
    calls.append(f"{pathlib.Path(workdir).parent.name}/{pathlib.Path(workdir).name}")
    return real_run(config, workdir)

  monkeypatch.setattr(grid, "default_run_fn", counting)
  args = argparse.Namespace(experiment=str(experiment))
  with caplog.at_level(logging.INFO, logger="jaxft"):
    assert harness_cli.main(args, flags) == 0
  assert calls == ["student/seed1"]  # only the killed run trains again ...
  assert f"resumed from step {newest}" in caplog.text  # ... from its newest checkpoint
  assert train_steps(last)[-1] == STEPS
  assert {r: p.stat().st_mtime_ns for r, p in finished.items()} == mtimes

  results = {r: [json.loads((root / r / f"seed{s}/results.json").read_text()) for s in (0, 1)]
             for r in ("teacher", "student")}
  acc = 100 * np.array([r["eval"]["accuracy"] for r in results["teacher"]])
  md = (root / "table.md").read_text()
  teacher = [line for line in md.splitlines() if line.startswith("| teacher | accuracy")][0]
  assert f"| 2 | {acc.mean():.2f} ± {np.std(acc, ddof=1):.2f} |" in teacher
  assert f"| 55.00 | {acc.mean() - 55.0:+.2f} |" in teacher
  robust = 100 * np.array([json.loads((root / f"student/seed{s}/eval_validation_best.json")
                                      .read_text())["robustness"]["pgd"]["pgd_l2/1/accuracy"]
                           for s in (0, 1)])
  pgd = [line for line in md.splitlines() if line.startswith("| student | PGD eps 1 accuracy")][0]
  assert f"| 2 | {robust.mean():.2f} ± {np.std(robust, ddof=1):.2f} |" in pgd
  tex = (root / "table.tex").read_text()
  assert rf"teacher & accuracy ($\times$100) & 2 & {acc.mean():.2f} $\pm$" in tex
  assert r"\bottomrule" in tex
  rows = {(r["row"], r["metric"]): r for r in csv.DictReader(io.StringIO(
      (root / "table.csv").read_text()))}
  assert [float(v) for v in rows["teacher", "accuracy"]["values"].split(";")] == pytest.approx(acc)
  assert float(rows["teacher", "accuracy"]["paper"]) == 55.0
  assert math.isclose(float(rows["student", "accuracy"]["mean"]),
                      100 * np.mean([r["eval"]["accuracy"] for r in results["student"]]))
  for name in ("bars.png", "curves.png"):
    assert (root / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  meta = json.loads((root / "table.json").read_text())
  assert meta["command"].startswith(f"jaxft table {experiment} --grid cpu --seeds 2 "
                                    f"--config.model.name={tiny_bert_dir}")
  assert meta["runs"] == {"finished": 4, "planned": 4} and meta["devices"]

  # A third call: nothing trains, nothing is rewritten but the tables; --publish copies them.
  everything = {p: p.stat().st_mtime_ns for p in root.glob("*/seed*/results.json")}
  published = tmp_path / "published"
  assert harness_cli.main(args, [*flags, "--publish", str(published)]) == 0
  assert calls == ["student/seed1"]
  assert {p: p.stat().st_mtime_ns for p in root.glob("*/seed*/results.json")} == everything
  assert (published / "table.md").read_text() == md
  assert {p.name for p in published.iterdir()} == {"table.md", "table_wide.md", "table.tex",
                                                   "table.csv", "table.json", "bars.png",
                                                   "curves.png"}
  wide = [line for line in (published / "table_wide.md").read_text().splitlines()
          if line.startswith("| teacher |")]
  assert wide[0].startswith(f"| teacher | {acc.mean():.2f} ± {np.std(acc, ddof=1):.2f} | 55.00 |")
