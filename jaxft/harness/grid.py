"""Experiment grid x seeds -> ordinary workdirs, run one after another, resumable.

An experiment file (experiments/<x>.py) declares, beside get_config(arg):
  GRID = {row_name: get_config_arg}          rows of the table,
  PAPER = {(row_name, metric): value}         published numbers beside ours (optional),
  SEARCH = {"train.learning_rate": ("log_uniform", 1e-5, 1e-3), ...}   search space (optional).
Run (row, seed s) lives in <root>/<row>/seed<s> and is `get_config(arg)` with config.seed = s and
the command line's --config overrides. Resuming a grid is running it again: a run whose
results.json exists is skipped; one with config.json but no results.json (killed, preempted,
crashed) is handed to the run function again on the same workdir, which resumes from its newest
checkpoint (train_and_evaluate does); a run with neither starts fresh.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import sys
import time
import types
from typing import Callable, Iterable, Sequence

from jaxft import config as config_lib
from jaxft.harness import aggregate

log = logging.getLogger("jaxft")

RunFn = Callable[..., dict]  # run_fn(config, workdir) -> results dict (train_and_evaluate)


load_module = config_lib.load_module  # experiment file -> module (GRID / PAPER / SEARCH)


def grid_of(module: types.ModuleType, path: str | pathlib.Path) -> dict[str, str | None]:
  """The experiment's GRID, checked: {row: get_config arg}."""
  grid = getattr(module, "GRID", None)
  if not grid:
    raise ValueError(f"{path} defines no GRID = {{row_name: get_config_arg}}; `jaxft table` "
                         "needs one (see experiments/glue_small.py)")
  for row in grid:
    if not row or "/" in row or row.startswith("."):
      raise ValueError(f"{path}: GRID row name {row!r} must be a plain directory name")
  return dict(grid)


def select_rows(grid: dict, only: Sequence[str] | None) -> dict:
  """GRID restricted to `only` (in GRID order); an unknown name fails listing the known ones."""
  if not only:
    return dict(grid)
  unknown = [r for r in only if r not in grid]
  if unknown:
    raise KeyError(f"--only names unknown rows {unknown}; the grid has {', '.join(grid)}")
  return {r: a for r, a in grid.items() if r in only}


def parse_seeds(text: str | int) -> list[int]:
  """'5' -> [0, 1, 2, 3, 4]; '0,3,7' -> [0, 3, 7]."""
  text = str(text).strip()
  try:
    if "," in text:
      seeds = [int(s) for s in text.split(",") if s.strip()]
    else:
      seeds = list(range(int(text)))
  except ValueError:
    raise ValueError(f"--seeds {text!r}: give a count (5) or a list (0,3,7)") from None
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise ValueError(f"--seeds {text!r}: need at least one seed, non-negative and distinct")
  return seeds


@dataclasses.dataclass
class Run:
  """One cell of the grid: experiment spec ('file.py:arg'), overrides (strings), its workdir."""

  row: str
  seed: int
  spec: str
  overrides: list[tuple[str, str]]
  workdir: pathlib.Path

  @property
  def name(self) -> str:
    return f"{self.row}/seed{self.seed}"

  def config(self):
    return config_lib.load(self.spec, self.overrides)

  def status(self) -> str:
    """"done" (results.json), "partial" (config.json only: resumes), "pruned" (a search stopped
    it on purpose), or "new"."""
    if (self.workdir / "results.json").is_file():
      return "done"
    if (self.workdir / "pruned.json").is_file():
      return "pruned"
    if (self.workdir / "config.json").is_file():
      return "partial"
    return "new"

  def cli_args(self) -> list[str]:
    """The `jaxft train` command line that runs this cell."""
    return ["train", "--config", self.spec, "--workdir", str(self.workdir),
            *[f"--config.{k}={v}" for k, v in self.overrides]]


def plan(path: str | pathlib.Path, rows: dict[str, str | None], seeds: Iterable[int],
         root: str | pathlib.Path, overrides: Sequence[tuple[str, str]] = ()) -> list[Run]:
  """Runs in row-major order (all seeds of a row together, so a partial table fills row by row)."""
  root = pathlib.Path(root)
  if any(k == "seed" for k, _ in overrides):
    raise ValueError("--config.seed is set per run by --seeds; drop the override")
  runs = []
  for row, arg in rows.items():
    spec = f"{path}:{arg}" if arg not in (None, "") else str(path)
    for s in seeds:
      runs.append(Run(row=row, seed=int(s), spec=spec, overrides=[*overrides, ("seed", str(s))],
                      workdir=root / row / f"seed{s}"))
  return runs


class GridProgress:
  """'[done/total] row/seedN (status) ...' lines on stderr, with elapsed time and a simple ETA."""

  def __init__(self, total: int, stream=None, enabled: bool = True):
    self.total, self.done = total, 0
    self.stream = stream or sys.stderr
    self.enabled = enabled
    self._t0 = time.time()
    self._ran = 0  # runs actually executed here (not skipped), for the ETA

  def _print(self, text: str) -> None:
    if self.enabled:
      print(text, file=self.stream, flush=True)

  def start(self, run: Run, status: str) -> None:
    verb = {"partial": "resuming", "new": "running"}.get(status, status)
    self._print(f"[grid {self.done}/{self.total}] {verb} {run.name} in {run.workdir}")

  def finish(self, run: Run, results: dict | None, skipped: bool, error: str | None = None) -> None:
    self.done += 1
    if not skipped:
      self._ran += 1
    elapsed = time.time() - self._t0
    left = self.total - self.done
    eta = f", eta {elapsed / self._ran * left:.0f}s" if self._ran and left else ""
    if error:
      what = f"FAILED ({error})"
    elif skipped:
      what = "done earlier, skipped"
    else:
      main = results.get("main_metric") if results else None
      value = (results or {}).get("eval", {}).get(main)
      what = f"{main}={value:.4g}" if isinstance(value, (int, float)) else "finished"
    self._print(f"[grid {self.done}/{self.total}] {run.name}: {what} ({elapsed:.0f}s{eta})")


def is_preemption(e: Exception) -> bool:
  """A SIGTERM turned into jaxft.train.loop.Preempted stops the grid even with keep_going."""
  loop = sys.modules.get("jaxft.train.loop")
  return loop is not None and isinstance(e, loop.Preempted)


def default_run_fn(config, workdir) -> dict:
  from jaxft import recipes
  return recipes.run(config, workdir)


def run_grid(runs: Sequence[Run], run_fn: RunFn | None = None, *, keep_going: bool = False,
             progress: GridProgress | None = None) -> dict[str, list[dict]]:
  """Runs every unfinished cell with run_fn(config, workdir) (default jaxft.recipes.run).

  Finished cells (results.json present) are read, not rerun; pruned cells (a search stopped them)
  are skipped. keep_going: a run that raises is reported and the grid goes on (its workdir stays
  resumable); otherwise the exception propagates after the progress line. Returns
  {row: [results dicts of the finished seeds, in seed order]}.
  """
  run_fn = run_fn or default_run_fn
  progress = progress or GridProgress(len(runs))
  out: dict[str, list[dict]] = {}
  failures = []
  for run in runs:
    out.setdefault(run.row, [])
    status = run.status()
    if status in ("done", "pruned"):
      results = aggregate.read_results(run.workdir)
      progress.finish(run, results, skipped=True)
      if results is not None:
        out[run.row].append(results)
      continue
    progress.start(run, status)
    try:
      results = run_fn(run.config(), run.workdir)
    except KeyboardInterrupt:
      raise
    except Exception as e:  # noqa: BLE001 - reported, re-raised unless keep_going
      progress.finish(run, None, skipped=False, error=f"{type(e).__name__}: {e}")
      if not keep_going or is_preemption(e):
        raise
      failures.append((run.name, e))
      continue
    if results is None:
      results = aggregate.read_results(run.workdir)
    progress.finish(run, results, skipped=False)
    if results is not None:
      out[run.row].append(results)
  if failures:
    log.warning("%d runs failed: %s; run the same command again to resume them", len(failures),
                ", ".join(n for n, _ in failures))
  return out


def collect(runs: Sequence[Run]) -> dict[str, list[dict]]:
  """{row: [results of finished seeds]} without running anything (for tables of a partial grid)."""
  out: dict[str, list[dict]] = {}
  for run in runs:
    res = aggregate.read_results(run.workdir)
    out.setdefault(run.row, [])
    if res is not None:
      out[run.row].append(res)
  return out
