"""Experiment grids x seeds -> ordinary workdirs, run one after another, resumable.

An experiment file (experiments/<x>.py) declares, beside get_config(arg):
  GRIDS = {"paper": {row: arg}, "cpu": {row: arg}}   the paper-sized table and the one a 2-core CPU
                                                      runs in hours (`jaxft table --grid NAME`; the
                                                      first grid is the default),
  PAPER = {(row, metric): value}                      published numbers beside ours (optional),
  METRICS = {grid: {label: metric path}}              more columns per row (optional; see
                                                      aggregate.metric_of for paths),
  SEARCH = {"train.learning_rate": ("log_uniform", 1e-5, 1e-3), ...}   search space (optional).
A row is a get_config arg (a string, or None for get_config(None)) or a `Row`: the arg plus config
overrides, some of which may come `From` an earlier row's run of the same seed (its workdir, its
exported model, or a file made from it), and an evaluation to run on the finished checkpoint
(`jaxft eval` options, e.g. robustness under attack), whose numbers become metrics of the row.

Run (row, seed s) lives in <root>/<row>/seed<s> and is `get_config(arg)` with the row's overrides,
then the command line's --config overrides, then config.seed = s. Resuming a grid is running it
again: a run whose results.json exists is skipped (its evaluation is run if it is missing); one
with config.json but no results.json (killed, preempted, crashed) is handed to the run function
again on the same workdir, which resumes from its newest checkpoint (train_and_evaluate does); a
run with neither starts fresh.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import sys
import time
import types
from typing import Any, Callable, Iterable, Mapping, Sequence

from jaxft import config as config_lib
from jaxft.harness import aggregate

log = logging.getLogger("jaxft")

RunFn = Callable[..., dict]  # run_fn(config, workdir) -> results dict (train_and_evaluate)


load_module = config_lib.load_module  # experiment file -> module (GRIDS / PAPER / SEARCH)

FROM_KINDS = ("workdir", "export", "file")


@dataclasses.dataclass(frozen=True)
class From:
  """A config value taken from an earlier row's run of the same seed, which runs first.

  what: "workdir" (that run's workdir, e.g. self_training.teacher), "export" (its best checkpoint
  in Hugging Face format, written once to <workdir>/export: e.g. distill.teacher), or "file":
  make(source_workdir, out_path, config) writes a file for this run (`config` is this run's), kept
  as <root>/<this row>/seed<s>.<name>.
  """

  row: str
  what: str = "workdir"
  make: Callable[[pathlib.Path, pathlib.Path, Any], None] | None = None
  name: str = ""

  def __post_init__(self):
    if self.what not in FROM_KINDS:
      raise ValueError(f"From({self.row!r}, what={self.what!r}): what is one of {FROM_KINDS}")
    if (self.what == "file") != (self.make is not None and bool(self.name)):
      raise ValueError(f"From({self.row!r}): a file needs make=fn and name=...; only a file does")


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of a grid: get_config(arg), then `overrides` ({dotted key: value or From(...)}), then
  after training `evaluate`: keyword arguments of jaxft.train.restore.evaluate_workdir (what
  `jaxft eval` takes: pgd_eps, pgd_steps, pgd_examples, synonym_examples, int8, speed_passes,
  split, which); its eval_<split>_<which>.json joins the run's results for the table."""

  arg: str | None = None
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  evaluate: Mapping[str, Any] | None = None

  def needs(self) -> list[str]:
    """The rows this one takes values from."""
    return [v.row for v in self.overrides.values() if isinstance(v, From)]


def as_row(value) -> Row:
  return value if isinstance(value, Row) else Row(arg=value)


def grids_of(module: types.ModuleType, path: str | pathlib.Path) -> dict[str, dict[str, Row]]:
  """The experiment's GRIDS, checked: {grid name: {row name: Row}}."""
  grids = getattr(module, "GRIDS", None)
  if grids is None and getattr(module, "GRID", None):
    raise ValueError(f"{path} defines GRID; jaxft table reads GRIDS = {{'paper': {{row: arg}}, "
                     "'cpu': {row: arg}} (one paper-sized grid, one CPU-sized; see "
                     "experiments/glue_small.py)")
  if not grids or not isinstance(grids, Mapping):
    raise ValueError(f"{path} defines no GRIDS = {{'paper': {{row: arg}}, 'cpu': {{row: arg}}}}; "
                     "`jaxft table` needs one (see experiments/glue_small.py)")
  out = {}
  for name, rows in grids.items():
    if not isinstance(rows, Mapping) or not rows:
      raise ValueError(f"{path}: GRIDS[{name!r}] must be a non-empty {{row name: arg}} dict")
    checked: dict[str, Row] = {}
    for row, value in rows.items():
      if not isinstance(row, str) or not row or "/" in row or row.startswith("."):
        raise ValueError(f"{path}: GRIDS[{name!r}] row name {row!r} must be a plain directory name")
      if not (value is None or isinstance(value, (str, Row))):
        raise ValueError(f"{path}: GRIDS[{name!r}][{row!r}] = {value!r}: a row is a get_config "
                         "arg (str or None) or a jaxft.harness.grid.Row")
      r = as_row(value)
      for dep in r.needs():
        if dep not in checked:
          raise ValueError(f"{path}: GRIDS[{name!r}][{row!r}] takes a value From({dep!r}), which "
                           "is not an earlier row of the same grid")
      checked[row] = r
    out[name] = checked
  return out


def grid_of(module: types.ModuleType, path: str | pathlib.Path,
            name: str | None = None) -> dict[str, Row]:
  """One grid of the experiment (default: the first it declares); an unknown name lists them."""
  grids = grids_of(module, path)
  if name is None or name == "":
    return next(iter(grids.values()))
  if name not in grids:
    raise KeyError(f"--grid {name!r}: {path} declares the grids {', '.join(grids)}")
  return grids[name]


def grid_name(module: types.ModuleType, path: str | pathlib.Path, name: str | None = None) -> str:
  """The grid `--grid name` selects (the first one when name is empty)."""
  grids = grids_of(module, path)
  return name if name else next(iter(grids))


def select_rows(grid: Mapping[str, Any], only: Sequence[str] | None) -> dict[str, Row]:
  """The grid restricted to `only` and the rows they take values from (in grid order); an unknown
  name fails listing the known ones."""
  grid = {r: as_row(v) for r, v in grid.items()}
  if not only:
    return grid
  unknown = [r for r in only if r not in grid]
  if unknown:
    raise KeyError(f"--only names unknown rows {unknown}; the grid has {', '.join(grid)}")
  wanted, todo = set(only), list(only)
  while todo:
    for dep in grid[todo.pop()].needs():
      if dep not in wanted:
        wanted.add(dep)
        todo.append(dep)
  added = [r for r in grid if r in wanted and r not in only]
  if added:
    log.info("--only: also running %s, which the selected rows take values from", ", ".join(added))
  return {r: v for r, v in grid.items() if r in wanted}


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


def override_text(value) -> str:
  """A Python value as the string an override parses back (booleans as true / false)."""
  if isinstance(value, bool):
    return "true" if value else "false"
  return str(value)


@dataclasses.dataclass
class Input:
  """A value this run takes from another row's run (resolved to a path when planned)."""

  source: From
  source_workdir: pathlib.Path
  path: pathlib.Path


@dataclasses.dataclass
class Run:
  """One cell of the grid: experiment spec ('file.py:arg'), overrides (strings), its workdir, what
  it takes from other runs, and the evaluation to run when it has finished."""

  row: str
  seed: int
  spec: str
  overrides: list[tuple[str, str]]
  workdir: pathlib.Path
  inputs: list[Input] = dataclasses.field(default_factory=list)
  evaluate: Mapping[str, Any] | None = None

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

  def stale(self) -> str:
    """Why this workdir's saved config is not the run's config (the experiment file or the
    overrides changed since it ran), or "" when it is the same run or has not started."""
    from jaxft.train.loop import config_change
    change = config_change(self.workdir, self.config())
    return f"workdir {self.workdir} holds a different experiment ({change})" if change else ""

  def cli_args(self) -> list[str]:
    """The `jaxft train` command line that runs this cell (its inputs made first)."""
    return ["train", "--config", self.spec, "--workdir", str(self.workdir),
            *[f"--config.{k}={v}" for k, v in self.overrides]]

  def prepare(self) -> None:
    """Makes what the run takes from other runs: checks they finished, exports a model, writes a
    file. Each is made once (a crash part-way leaves no half-made input behind)."""
    for item in self.inputs:
      src = item.source_workdir
      if not (src / "results.json").is_file():
        raise RuntimeError(f"{self.name} takes {item.source.what} of {item.source.row}/seed"
                           f"{self.seed}, which has not finished ({src}); run that row first")
      if item.source.what == "export" and not (item.path / "config.json").is_file():
        from jaxft.recipes import setup_for
        from jaxft.train.restore import export_workdir
        log.info("%s: exporting %s for it", self.name, src)
        export_workdir(src, item.path, overwrite=True, setup_fn=setup_for)
      elif item.source.what == "file" and not item.path.is_file():
        item.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = item.path.with_name(item.path.name + ".tmp")
        item.source.make(src, tmp, self.config())
        os.replace(tmp, item.path)

  def eval_file(self) -> pathlib.Path | None:
    """Where the row's evaluation writes (jaxft.train.restore.evaluate_workdir), or None."""
    if not self.evaluate:
      return None
    split = self.evaluate.get("split")
    if not split:
      saved = self.workdir / "config.json"
      split = (json.loads(saved.read_text())["data"]["eval_split"] if saved.is_file()
               else self.config().data.eval_split)
    return self.workdir / f"eval_{split}_{self.evaluate.get('which', 'best')}.json"

  def needs_evaluation(self) -> bool:
    path = self.eval_file()
    if path is None:
      return False
    if not path.is_file():
      return True
    have = json.loads(path.read_text())
    want = []
    if self.evaluate.get("pgd_eps") or self.evaluate.get("synonym_examples"):
      want.append("robustness")
    if self.evaluate.get("int8"):
      want.append("int8")
    if self.evaluate.get("speed_passes"):
      want.append("inference")
    return any(k not in have for k in want)

  def run_evaluation(self) -> None:
    from jaxft.recipes import setup_for
    from jaxft.train.restore import evaluate_workdir
    log.info("%s: evaluating %s", self.name, dict(self.evaluate))
    evaluate_workdir(self.workdir, setup_fn=setup_for, **dict(self.evaluate))


def plan(path: str | pathlib.Path, rows: Mapping[str, Any], seeds: Iterable[int],
         root: str | pathlib.Path, overrides: Sequence[tuple[str, str]] = ()) -> list[Run]:
  """Runs in row-major order (all seeds of a row together, so a partial table fills row by row,
  and a row's inputs from earlier rows exist when it starts)."""
  root = pathlib.Path(root)
  if any(k == "seed" for k, _ in overrides):
    raise ValueError("--config.seed is set per run by --seeds; drop the override")
  runs = []
  for row, value in rows.items():
    r = as_row(value)
    spec = f"{path}:{r.arg}" if r.arg not in (None, "") else str(path)
    for s in seeds:
      row_overrides, inputs = [], []
      for key, v in r.overrides.items():
        if isinstance(v, From):
          src = root / v.row / f"seed{s}"
          target = {"workdir": src, "export": src / "export",
                    "file": root / row / f"seed{s}.{v.name}"}[v.what]
          inputs.append(Input(v, src, target))
          v = target
        row_overrides.append((key, override_text(v)))
      runs.append(Run(row=row, seed=int(s), spec=spec,
                      overrides=[*row_overrides, *overrides, ("seed", str(s))],
                      workdir=root / row / f"seed{s}", inputs=inputs, evaluate=r.evaluate))
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


def same_run(run: Run, search: pathlib.Path) -> pathlib.Path | None:
  """A finished workdir under `search` whose saved config gives this run's settings (another
  experiment's identical baseline, say: the `experiment` key names the file, not a setting), or
  None. The comparison is the one resuming uses (jaxft.train.loop.config_change)."""
  from jaxft.train.loop import config_change
  config = run.config()
  mine = run.workdir.resolve()
  for results in sorted(search.glob("**/results.json")):
    workdir = results.parent
    if (workdir.resolve() != mine and (workdir / "config.json").is_file()
        and not config_change(workdir, config)):
      return workdir
  return None


def _link_or_copy(src: str, dst: str) -> None:
  """Checkpoint arrays are hard-linked (written once, never in place); the small files a later
  evaluation or export may rewrite (JSON, logs) are copied, so the source never changes."""
  if os.path.getsize(src) >= 1 << 20:
    try:
      os.link(src, dst)
      return
    except OSError:  # another file system
      pass
  shutil.copy2(src, dst)


def adopt(run: Run, source: pathlib.Path) -> None:
  """Makes run.workdir a copy of the finished `source` workdir (whole, or not at all)."""
  tmp = run.workdir.with_name(run.workdir.name + ".adopting")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.parent.mkdir(parents=True, exist_ok=True)
  shutil.copytree(source, tmp, copy_function=_link_or_copy)
  if run.workdir.is_dir():
    run.workdir.rmdir()  # empty: a start that made nothing
  os.replace(tmp, run.workdir)
  log.info("%s: the same run finished in %s; taken from there, not rerun", run.name, source)


def run_grid(runs: Sequence[Run], run_fn: RunFn | None = None, *, keep_going: bool = False,
             progress: GridProgress | None = None,
             reuse: pathlib.Path | None = None) -> dict[str, list[dict]]:
  """Runs every unfinished cell with run_fn(config, workdir) (default jaxft.recipes.run).

  Finished cells (results.json present) are read, not rerun; pruned cells (a search stopped them)
  are skipped. reuse: a cell not started yet is first looked for under this folder (same_run)
  and, when found, copied instead of run. keep_going: a run that raises is reported and the grid
  goes on (its workdir stays resumable); otherwise the exception propagates after the progress
  line. Returns {row: [results dicts of the finished seeds, in seed order]}.
  """
  run_fn = run_fn or default_run_fn
  progress = progress or GridProgress(len(runs))
  out: dict[str, list[dict]] = {}
  failures = []
  for run in runs:
    out.setdefault(run.row, [])
    status = run.status()
    if status == "new" and reuse is not None and not (
        run.workdir.is_dir() and any(run.workdir.iterdir())):
      source = same_run(run, reuse)
      if source is not None:
        adopt(run, source)
        status = run.status()
    skipped = status in ("done", "pruned")
    if skipped and not (status == "done" and run.needs_evaluation()):
      results = aggregate.read_results(run.workdir)
      progress.finish(run, results, skipped=True)
      if results is not None:
        out[run.row].append(results)
      continue
    progress.start(run, "evaluating" if skipped else status)
    try:
      if not skipped:
        run.prepare()
        run_fn(run.config(), run.workdir)
      if run.needs_evaluation():
        run.run_evaluation()
    except KeyboardInterrupt:
      raise
    except Exception as e:  # noqa: BLE001 - reported, re-raised unless keep_going
      progress.finish(run, None, skipped=False, error=f"{type(e).__name__}: {e}")
      if not keep_going or is_preemption(e):
        raise
      failures.append((run.name, e))
      continue
    results = aggregate.read_results(run.workdir)  # results.json and the row's evaluation
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
