"""Hyperparameter search over a space declared in the experiment file; every trial is a workdir.

    SEARCH = {"train.learning_rate": ("log_uniform", 1e-5, 1e-3),
              "train.batch_size": ("choice", [16, 32]),
              "train.warmup_ratio": ("uniform", 0.0, 0.2),
              "train.num_epochs": ("int", 2, 5)}

Strategies:
  grid: the product of every parameter's values (choice: its list; numeric ranges: `points`
    values, log-spaced for log_uniform, evenly spaced otherwise; ints rounded and deduplicated);
  random: `trials` independent draws from np.random.default_rng(seed) (log_uniform: exp(U(log lo,
    log hi)));
  bayes: optuna's TPE sampler (Bergstra et al. 2011) seeded, the study kept in <dir>/study.db so a
    killed search continues. Pruning (optuna MedianPruner): each trial runs as a `jaxft train`
    subprocess; its eval rows in metrics.jsonl are reported to optuna as they appear, and a trial
    whose intermediate value is worse than the median of earlier trials at the same step is sent
    SIGTERM (the loop checkpoints and exits) and marked pruned (pruned.json in its workdir).
Trial k of row r lives in <root>/search/<r>/trial<k>; the ranked trials go to trials.csv and the
best one's settings to best_overrides.txt as a runnable line of --config overrides.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import math
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from jaxft.harness import aggregate
from jaxft.harness.grid import GridProgress, Run, RunFn, default_run_fn, run_grid

log = logging.getLogger("jaxft")

KINDS = ("log_uniform", "uniform", "int", "choice")


@dataclasses.dataclass(frozen=True)
class Param:
  key: str  # dotted config key, e.g. "train.learning_rate"
  kind: str
  low: float | None = None
  high: float | None = None
  choices: tuple = ()


def parse_space(space: dict) -> list[Param]:
  """SEARCH dict -> checked Params (sorted by key, so trial order does not depend on dict order)."""
  if not space:
    raise ValueError("empty search space: define SEARCH = {'train.learning_rate': ('log_uniform', "
                     "1e-5, 1e-3), ...} in the experiment file")
  out = []
  for key, spec in sorted(space.items()):
    if not isinstance(spec, (tuple, list)) or not spec or spec[0] not in KINDS:
      raise ValueError(f"SEARCH[{key!r}] = {spec!r}: expected (kind, ...) with kind one of {KINDS}")
    kind = spec[0]
    if kind == "choice":
      if len(spec) != 2 or not isinstance(spec[1], (list, tuple)) or not spec[1]:
        raise ValueError(f"SEARCH[{key!r}]: choice needs a non-empty list: ('choice', [16, 32])")
      out.append(Param(key, kind, choices=tuple(spec[1])))
      continue
    if len(spec) != 3:
      raise ValueError(f"SEARCH[{key!r}]: {kind} needs (kind, low, high), got {spec!r}")
    low, high = spec[1], spec[2]
    if not low < high:
      raise ValueError(f"SEARCH[{key!r}]: low {low} must be below high {high}")
    if kind == "log_uniform" and low <= 0:
      raise ValueError(f"SEARCH[{key!r}]: log_uniform needs low > 0, got {low}")
    if kind == "int" and (int(low) != low or int(high) != high):
      raise ValueError(f"SEARCH[{key!r}]: int bounds must be integers, got {low}, {high}")
    out.append(Param(key, kind, low, high))
  return out


def grid_values(p: Param, points: int) -> list:
  if p.kind == "choice":
    return list(p.choices)
  if points < 1:
    raise ValueError(f"grid points must be >= 1, got {points}")
  if p.kind == "log_uniform":
    vals = np.exp(np.linspace(math.log(p.low), math.log(p.high), points))
    return [float(v) for v in vals]
  vals = np.linspace(p.low, p.high, points)
  if p.kind == "int":
    return sorted({int(round(v)) for v in vals})
  return [float(v) for v in vals]


def grid_trials(params: Sequence[Param], points: int = 3) -> list[dict]:
  """Cartesian product of every parameter's grid values, first key varying slowest."""
  keys = [p.key for p in params]
  return [dict(zip(keys, combo)) for combo in itertools.product(*[grid_values(p, points)
                                                                  for p in params])]


def sample(p: Param, rng: np.random.Generator):
  if p.kind == "choice":
    return p.choices[int(rng.integers(len(p.choices)))]
  if p.kind == "log_uniform":
    return float(math.exp(rng.uniform(math.log(p.low), math.log(p.high))))
  if p.kind == "int":
    return int(rng.integers(int(p.low), int(p.high) + 1))
  return float(rng.uniform(p.low, p.high))


def random_trials(params: Sequence[Param], trials: int, seed: int = 0) -> list[dict]:
  """`trials` draws; trial k is the same for a given (space, seed) however many trials are asked."""
  out = []
  for k in range(trials):
    rng = np.random.default_rng([seed, k])
    out.append({p.key: sample(p, rng) for p in params})
  return out


def format_value(v: Any) -> str:
  """A value as a --config override string that config.apply_override parses back to itself."""
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, float):
    return repr(float(v))
  if isinstance(v, (np.integer, np.floating)):
    return format_value(v.item())
  return str(v)


def overrides_line(values: dict) -> str:
  return " ".join(f"--config.{k}={format_value(v)}" for k, v in sorted(values.items()))


def direction_of(metric: str) -> str:
  """jaxft selects on metrics where higher is better, except losses."""
  return "minimize" if metric == "loss" or metric.endswith("loss") else "maximize"


def main_metric_of(config) -> str:
  if config.train.early_stopping_metric:
    return config.train.early_stopping_metric
  from jaxft.data import tasks
  return tasks.get(config.data.name).main_metric


@dataclasses.dataclass
class Trial:
  number: int
  values: dict
  run: Run
  state: str = "new"  # complete / pruned / failed / new
  value: float | None = None


def trial_runs(row: str, spec: str, trial_values: Sequence[dict], root: pathlib.Path,
               overrides: Sequence[tuple[str, str]] = (), seed: int = 0, start: int = 0) -> list[Trial]:
  out = []
  for k, values in enumerate(trial_values, start=start):
    ov = [*overrides, *[(key, format_value(v)) for key, v in sorted(values.items())],
          ("seed", str(seed))]
    out.append(Trial(k, dict(values), Run(row=row, seed=seed, spec=spec, overrides=ov,
                                          workdir=root / f"trial{k}")))
  return out


def _value(results: dict | None, metric: str | None, which: str) -> float | None:
  if results is None:
    return None
  return aggregate.metric_of(results, metric, which)[1]


def write_report(trials: Sequence[Trial], root: pathlib.Path, metric: str, direction: str,
                 base_overrides: Sequence[tuple[str, str]] = ()) -> Trial | None:
  """trials.csv (ranked, best first) and best_overrides.txt; returns the best finished trial."""
  root.mkdir(parents=True, exist_ok=True)
  done = [t for t in trials if t.value is not None and math.isfinite(t.value)]
  sign = -1.0 if direction == "maximize" else 1.0
  ranked = sorted(done, key=lambda t: (sign * t.value, t.number))
  rest = [t for t in trials if t not in ranked]
  keys = sorted({k for t in trials for k in t.values})
  with open(root / "trials.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["rank", "trial", "state", metric, *keys, "workdir"])
    for i, t in enumerate(ranked + rest):
      w.writerow([i + 1 if t in ranked else "", t.number, t.state,
                  "" if t.value is None else repr(t.value),
                  *[format_value(t.values[k]) if k in t.values else "" for k in keys], t.run.workdir])
  if not ranked:
    return None
  best = ranked[0]
  fixed = " ".join(f"--config.{k}={v}" for k, v in base_overrides)
  line = " ".join(x for x in (fixed, overrides_line(best.values)) if x)
  (root / "best_overrides.txt").write_text(line + "\n")
  (root / "best.json").write_text(json.dumps({"trial": best.number, metric: best.value,
                                              "values": best.values, "workdir": str(best.run.workdir),
                                              "overrides": line}, indent=2, default=str))
  return best


def run_listed(trials: Sequence[Trial], run_fn: RunFn | None, metric: str | None, which: str,
               keep_going: bool = True, progress: GridProgress | None = None) -> list[Trial]:
  """Grid / random search: the trials are a fixed list, so resuming is rerunning (run_grid skips
  finished workdirs)."""
  run_grid([t.run for t in trials], run_fn, keep_going=keep_going, progress=progress)
  for t in trials:
    res = aggregate.read_results(t.run.workdir)
    t.value = _value(res, metric, which)
    t.state = "complete" if res is not None else ("pruned" if t.run.status() == "pruned" else "failed")
  return trials


# ---------------------------------------------------------------------------------------------
# Bayesian search (optuna) with median pruning on intermediate eval metrics.


def new_eval_values(path: pathlib.Path, metric: str, offset: int) -> tuple[list[tuple[int, float]], int]:
  """Eval rows of metrics.jsonl after byte `offset` -> ([(step, value)], new offset).

  Only complete lines count (a line being written has no newline yet)."""
  if not path.is_file():
    return [], offset
  with open(path, "rb") as f:
    f.seek(offset)
    chunk = f.read()
  end = chunk.rfind(b"\n") + 1
  out = []
  for line in chunk[:end].decode("utf-8").splitlines():
    if not line.strip():
      continue
    row = json.loads(line)
    if row.get("kind") == "eval" and f"eval/{metric}" in row:
      out.append((int(row["step"]), float(row[f"eval/{metric}"])))
  return out, offset + end


def default_command(run: Run) -> list[str]:
  return [sys.executable, "-m", "jaxft", *run.cli_args()]


def run_watched(run: Run, report: Callable[[float, int], bool], metric: str, *,
                command: Callable[[Run], list[str]] = default_command, poll_s: float = 1.0) -> str:
  """Runs `command(run)` as a subprocess, feeding each new eval value to report(value, step).

  When report returns True (prune), the process gets SIGTERM (jaxft's loop checkpoints and exits),
  and pruned.json is written into the workdir. Output goes to <workdir>.log beside the workdir.
  Returns "complete", "pruned" or raises RuntimeError on a failed process.
  """
  run.workdir.parent.mkdir(parents=True, exist_ok=True)
  logfile = run.workdir.parent / f"{run.workdir.name}.log"
  metrics_path = run.workdir / "metrics.jsonl"
  offset, reported = 0, set()
  with open(logfile, "ab") as out:
    proc = subprocess.Popen(command(run), stdout=out, stderr=subprocess.STDOUT)
    try:
      while True:
        finished = proc.poll() is not None
        rows, offset = new_eval_values(metrics_path, metric, offset)
        for step, value in rows:
          if step in reported:  # a resumed run re-logs steps after its last checkpoint
            continue
          reported.add(step)
          if report(value, step):
            if not finished:
              proc.send_signal(signal.SIGTERM)
              try:
                proc.wait(timeout=600)
              except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            (run.workdir / "pruned.json").write_text(json.dumps({"step": step, metric: value}))
            return "pruned"
        if finished:
          break
        time.sleep(poll_s)
    except BaseException:
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
      raise
  if proc.returncode != 0 or not (run.workdir / "results.json").is_file():
    raise RuntimeError(f"trial {run.workdir} failed (exit {proc.returncode}); see {logfile}")
  return "complete"


def run_bayes(row: str, spec: str, params: Sequence[Param], root: pathlib.Path, trials: int, *,
              metric: str, which: str = "eval", overrides: Sequence[tuple[str, str]] = (),
              seed: int = 0, prune: bool = True, run_fn: RunFn | None = None,
              command: Callable[[Run], list[str]] = default_command, poll_s: float = 1.0,
              startup_trials: int = 2, progress_stream=None) -> list[Trial]:
  """TPE search for `trials` finished (complete or pruned) trials; resumable through study.db.

  prune=True runs trials as subprocesses watched by run_watched (MedianPruner with
  n_startup_trials=startup_trials); prune=False runs them in-process with run_fn.
  """
  import optuna
  from optuna.trial import TrialState

  optuna.logging.set_verbosity(optuna.logging.WARNING)
  root.mkdir(parents=True, exist_ok=True)
  direction = direction_of(metric)
  study = optuna.create_study(
      study_name=row, storage=f"sqlite:///{root / 'study.db'}", load_if_exists=True,
      direction=direction, sampler=optuna.samplers.TPESampler(seed=seed),
      pruner=optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=0))
  for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
    study.tell(t.number, state=TrialState.FAIL)  # left by a killed search; its workdir stays
  stream = progress_stream or sys.stderr

  def finished():
    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]

  while len(finished()) < trials:
    ot = study.ask()
    values = {}
    for p in params:
      if p.kind == "choice":
        values[p.key] = ot.suggest_categorical(p.key, list(p.choices))
      elif p.kind == "int":
        values[p.key] = ot.suggest_int(p.key, int(p.low), int(p.high))
      else:
        values[p.key] = ot.suggest_float(p.key, p.low, p.high, log=p.kind == "log_uniform")
    (trial,) = trial_runs(row, spec, [values], root, overrides, seed, start=ot.number)
    print(f"[search {row} {len(finished()) + 1}/{trials}] trial {ot.number}: "
          f"{overrides_line(values)}", file=stream, flush=True)
    try:
      if prune:
        def report(value, step):
          ot.report(value, step)
          return ot.should_prune()
        state = run_watched(trial.run, report, metric, command=command, poll_s=poll_s)
        if state == "pruned":
          study.tell(ot, state=TrialState.PRUNED)
          print(f"  trial {ot.number} pruned", file=stream, flush=True)
          continue
        results = aggregate.read_results(trial.run.workdir)
      else:
        results = (run_fn or default_run_fn)(trial.run.config(), trial.run.workdir)
      value = _value(results, metric, which)
    except KeyboardInterrupt:
      study.tell(ot, state=TrialState.FAIL)
      raise
    except Exception as e:  # noqa: BLE001 - a failing trial is a data point, not the end
      log.warning("trial %d failed: %s", ot.number, e)
      study.tell(ot, state=TrialState.FAIL)
      continue
    study.tell(ot, value)
    print(f"  trial {ot.number}: {metric}={value:.4g}", file=stream, flush=True)

  out = []
  for t in study.get_trials(deepcopy=False):
    values = {p.key: t.params[p.key] for p in params if p.key in t.params}
    (trial,) = trial_runs(row, spec, [values], root, overrides, seed, start=t.number)
    trial.state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned"}.get(t.state, "failed")
    trial.value = t.value if t.state == TrialState.COMPLETE else None
    out.append(trial)
  return out


def search(row: str, spec: str, space: dict, root: str | pathlib.Path, *, strategy: str = "random",
           trials: int = 8, points: int = 3, metric: str | None = None, which: str = "eval",
           overrides: Sequence[tuple[str, str]] = (), seed: int = 0, prune: bool = True,
           run_fn: RunFn | None = None, command: Callable[[Run], list[str]] = default_command,
           poll_s: float = 1.0, progress: GridProgress | None = None) -> tuple[list[Trial], Trial | None]:
  """Runs the search for one grid row in `root`; returns (trials, best). See the module docstring.

  metric: what to optimise (default: the config's main metric); which: results["eval"] or ["best"].
  """
  root = pathlib.Path(root)
  params = parse_space(space)
  clash = {p.key for p in params} & {k for k, _ in overrides}
  if clash:
    raise ValueError(f"--config overrides {sorted(clash)} are also searched; drop one of them")
  if metric is None:
    from jaxft import config as config_lib
    metric = main_metric_of(config_lib.load(spec, list(overrides)))
  if strategy == "grid":
    trial_list = trial_runs(row, spec, grid_trials(params, points), root, overrides, seed)
    run_listed(trial_list, run_fn, metric, which, progress=progress or GridProgress(len(trial_list)))
  elif strategy == "random":
    trial_list = trial_runs(row, spec, random_trials(params, trials, seed), root, overrides, seed)
    run_listed(trial_list, run_fn, metric, which, progress=progress or GridProgress(len(trial_list)))
  elif strategy == "bayes":
    trial_list = run_bayes(row, spec, params, root, trials, metric=metric, which=which,
                           overrides=overrides, seed=seed, prune=prune, run_fn=run_fn,
                           command=command, poll_s=poll_s)
  else:
    raise ValueError(f"unknown search strategy {strategy!r}; choose grid, random or bayes")
  best = write_report(trial_list, root, metric, direction_of(metric), overrides)
  return trial_list, best
