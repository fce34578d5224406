"""`jaxft table`: grid x seeds -> table.md (and its wide form) / table.tex / table.csv /
table.json / curves.png / bars.png; with --search, a hyperparameter search per row; with
--analyze, a report on one finished workdir; with --docs, docs/results.md refreshed from the
published tables.

    jaxft table experiments/glue_small.py --grid cpu --seeds 3        # the CPU-sized table
    jaxft table experiments/glue_small.py --seeds 5                   # the first grid ("paper")
    jaxft table experiments/glue_small.py --seeds 2 --only rte,mrpc --config.train.num_steps=50
    jaxft table experiments/glue_small.py --grid cpu --dry-run        # the runs and their state
    jaxft table experiments/prune_movement.py --grid cpu --reuse      # same runs elsewhere: copied
    jaxft table experiments/glue_small.py --grid cpu --no-run --publish   # -> docs/tables/...
    jaxft table --docs [docs/results.md]                              # refresh its tables
    jaxft table experiments/glue_small.py --search random --trials 8 --only rte
    jaxft table experiments/glue_small.py --search bayes --trials 20 --only rte   # TPE + pruning
    jaxft table workdirs/glue_small/paper/rte/seed0 --analyze --examples 0,1,2

Runs live in <workdir root>/<row>/seed<s> (default root workdirs/<experiment stem>/<grid>); a second
call reuses finished runs and resumes unfinished ones. `jaxft.cli` parses the subcommand and the
positional experiment; `main(args, rest)` parses the rest.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shlex
import shutil
import sys

from jaxft import config as config_lib
from jaxft.harness import aggregate, grid, plots, tables

DOCS_TABLES = pathlib.Path("docs") / "tables"


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxft table", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--grid", default="", help="which of the experiment's GRIDS (default: the first, "
                 "by convention 'paper'; 'cpu' is the CPU-sized one)")
  p.add_argument("--seeds", default="1", help="number of seeds (0..N-1) or a list: 0,3,7")
  p.add_argument("--only", default="", help="comma-separated rows to run (default: all; rows "
                 "they take values from come along)")
  p.add_argument("--workdir-root", default="", help="default: workdirs/<experiment stem>/<grid>")
  p.add_argument("--metric", default="", help="metric(s) to tabulate, comma-separated (default: "
                 "each row's main metric, the ones PAPER names, and the experiment's METRICS)")
  p.add_argument("--which", choices=("eval", "best"), default="eval",
                 help="eval: metrics at the end of training; best: at the best eval")
  p.add_argument("--units", choices=("auto", "raw", "percent"), default="auto",
                 help="auto: fractions (accuracy, F1, ...) x100, as papers print them")
  p.add_argument("--digits", type=int, default=2)
  p.add_argument("--dry-run", action="store_true", help="list the runs and their state; run nothing")
  p.add_argument("--no-run", action="store_true", help="aggregate the finished runs only")
  p.add_argument("--keep-going", action="store_true",
                 help="a failing run is reported and the grid goes on (rerun to resume it)")
  p.add_argument("--reuse", nargs="?", const="workdirs", default="", metavar="DIR",
                 help="a run not made yet is first looked for among the finished runs under DIR "
                 "(default workdirs): one whose saved config gives the same settings, from "
                 "another experiment file say, is copied (checkpoints hard-linked), not rerun")
  p.add_argument("--publish", nargs="?", const="auto", default="", metavar="DIR",
                 help="also copy the tables, plots and table.json to DIR (default "
                 "docs/tables/<experiment stem>/<grid>), where --docs finds them")
  p.add_argument("--docs", action="store_true",
                 help="refresh the generated tables of the positional Markdown file (default "
                 "docs/results.md) from the published ones; runs nothing")
  s = p.add_argument_group("search (per selected row; space = the experiment's SEARCH)")
  s.add_argument("--search", choices=("grid", "random", "bayes"), default=None)
  s.add_argument("--trials", type=int, default=8, help="random / bayes: number of trials")
  s.add_argument("--grid-points", type=int, default=3, help="grid: values per numeric range")
  s.add_argument("--search-seed", type=int, default=0)
  s.add_argument("--no-prune", action="store_true", help="bayes: run trials in-process, no pruning")
  a = p.add_argument_group("analysis of one finished workdir (the positional is the workdir)")
  a.add_argument("--analyze", action="store_true")
  a.add_argument("--split", default=None)
  a.add_argument("--examples", default="0,1,2,3", help="eval examples for token attributions")
  a.add_argument("--out", default="", help="default: <workdir>/analysis")
  return p


def _root(args, opts, grid_name: str) -> pathlib.Path:
  if opts.workdir_root:
    return pathlib.Path(opts.workdir_root)
  return pathlib.Path("workdirs") / pathlib.Path(args.experiment).stem / grid_name


def _split_flags_and_overrides(rest: list[str]) -> tuple[list[str], list[str]]:
  flags, overrides = [], []
  i = 0
  while i < len(rest):
    a = rest[i]
    if a.startswith("--config."):
      overrides.append(a)
      if "=" not in a and i + 1 < len(rest):
        overrides.append(rest[i + 1])
        i += 1
    else:
      flags.append(a)
    i += 1
  return flags, overrides


def metrics_of(module, grid_name: str):
  """The experiment's METRICS columns for this grid ({label: path} or a list of paths)."""
  extra = getattr(module, "METRICS", None) or {}
  return extra.get(grid_name) if isinstance(extra, dict) else extra


def machine() -> str:
  """This machine in a few words: OS, architecture, CPU count."""
  return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores"


def command_line(args, opts, overrides) -> str:
  """The `jaxft table` command that reproduces the table (without output-only flags)."""
  parts = ["jaxft", "table", str(args.experiment)]
  if opts.grid:
    parts += ["--grid", opts.grid]
  parts += ["--seeds", str(opts.seeds)]
  if opts.only:
    parts += ["--only", opts.only]
  if opts.metric:
    parts += ["--metric", opts.metric]
  if opts.which != "eval":
    parts += ["--which", opts.which]
  parts += [f"--config.{k}={v}" for k, v in overrides]
  return shlex.join(parts)


def table_meta(runs, grid_name: str, command: str) -> dict:
  """What table.json records beside the numbers: the command, machine, dates, the runs' devices."""
  finished = [r.workdir / "results.json" for r in runs if (r.workdir / "results.json").is_file()]
  dates = sorted(datetime.datetime.fromtimestamp(p.stat().st_mtime, datetime.timezone.utc).date()
                 for p in finished)
  devices = sorted({str((aggregate.read_results(p.parent) or {}).get("device", "?"))
                    for p in finished})
  return {"command": command, "grid": grid_name, "machine": machine(), "devices": devices,
          "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
          "runs_finished": [d.isoformat() for d in (dates[:1] + dates[-1:])] if dates else [],
          "runs": {"finished": len(finished), "planned": len(runs)}}


def aggregate_and_write(module, runs, root: pathlib.Path, opts, grid_name: str = "",
                        command: str = "", stream=sys.stdout) -> list:
  """Tables, plots and table.json over whatever runs have finished; prints the Markdown table."""
  results = grid.collect(runs)
  missing = [r.name for r in runs if aggregate.read_results(r.workdir) is None]
  cells = aggregate.build_cells(results, getattr(module, "PAPER", None), opts.metric or None,
                                opts.which, opts.units, extra=metrics_of(module, grid_name))
  title = pathlib.Path(module.__file__).stem + (f", grid {grid_name}" if grid_name else "")
  title += f" ({len(missing)} runs missing)" if missing else ""
  paths = tables.write_all(cells, root, title=title, digits=opts.digits)
  by_row: dict[str, list] = {}
  for r in runs:
    by_row.setdefault(r.row, []).append(r.workdir)
  curves = plots.learning_curves(by_row, root / "curves.png", opts.metric.split(",")[0] or None)
  bars = plots.bar_chart([c for c in cells if c.primary], root / "bars.png")
  paths["json"] = root / "table.json"
  paths["json"].write_text(json.dumps(table_meta(runs, grid_name, command), indent=2) + "\n")
  print(paths["md"].read_text(), file=stream)
  written = [p for p in (*paths.values(), curves, bars) if p is not None]
  print("wrote " + ", ".join(map(str, written)), file=stream)
  if opts.publish:
    dest = (DOCS_TABLES / pathlib.Path(module.__file__).stem / grid_name
            if opts.publish == "auto" else pathlib.Path(opts.publish))
    dest.mkdir(parents=True, exist_ok=True)
    for p in written:
      shutil.copy2(p, dest / p.name)
    print(f"published to {dest}; `jaxft table --docs` puts it into docs/results.md", file=stream)
  return cells


def _table(args, opts, overrides) -> int:
  module = grid.load_module(args.experiment)
  grid_name = grid.grid_name(module, args.experiment, opts.grid)
  rows = grid.select_rows(grid.grid_of(module, args.experiment, grid_name),
                          [r for r in opts.only.split(",") if r])
  root = _root(args, opts, grid_name)
  if opts.search:
    return _search(args, opts, overrides, module, rows, root)
  runs = grid.plan(args.experiment, rows, grid.parse_seeds(opts.seeds), root, overrides)
  if opts.dry_run:
    for r in runs:
      needs = "".join(f" (after {i.source.row})" for i in r.inputs)
      if opts.reuse and r.status() == "new":
        same = grid.same_run(r, pathlib.Path(opts.reuse))
        needs += f" (reuses {same})" if same else ""
      print(f"{r.status():8s} {r.name:24s} {r.workdir}  jaxft {shlex.join(r.cli_args())}{needs}")
    return 0
  for r in runs:  # fail on a bad override or grid arg now, not after hours of other runs
    r.config()
  stale = [r.stale() for r in runs]
  if any(stale):  # a finished run of an older config would be tabulated as this one
    raise ValueError(
        "these runs were made with another config than the grid now gives (the experiment file "
        "or the --config overrides changed):\n  " + "\n  ".join(m for m in stale if m)
        + f"\nmove them aside (or all of {root}), or pass --workdir-root DIR to run the grid "
        "elsewhere")
  if not opts.no_run:
    try:
      grid.run_grid(runs, keep_going=opts.keep_going,
                    reuse=pathlib.Path(opts.reuse) if opts.reuse else None)
    except Exception as e:  # noqa: BLE001
      if not grid.is_preemption(e):
        raise
      print(f"{e}\nthe grid stopped; run the same command again to resume it", file=sys.stderr)
      return 0
  aggregate_and_write(module, runs, root, opts, grid_name, command_line(args, opts, overrides))
  return 0


def _search(args, opts, overrides, module, rows, root) -> int:
  from jaxft.harness import search as search_lib
  space = getattr(module, "SEARCH", None)
  if not space:
    raise ValueError(f"{args.experiment} defines no SEARCH = {{'train.learning_rate': "
                         "('log_uniform', 1e-5, 1e-3), ...}; --search needs one")
  params = search_lib.parse_space(space)
  for row, r in rows.items():
    if r.needs():
      raise ValueError(f"--search: row {row!r} takes values from other rows ({r.needs()}); "
                       "search a row that stands alone")
    spec = f"{args.experiment}:{r.arg}" if r.arg not in (None, "") else str(args.experiment)
    row_overrides = [(k, grid.override_text(v)) for k, v in r.overrides.items()]
    out = root / "search" / row
    if opts.dry_run:
      if opts.search == "grid":
        listed = search_lib.grid_trials(params, opts.grid_points)
      elif opts.search == "random":
        listed = search_lib.random_trials(params, opts.trials, opts.search_seed)
      else:
        print(f"{row}: bayes search, {opts.trials} trials in {out} (chosen as it goes)")
        continue
      for k, v in enumerate(listed):
        print(f"{row} trial{k}: {search_lib.overrides_line(v)}")
      continue
    _, best = search_lib.search(row, spec, space, out, strategy=opts.search, trials=opts.trials,
                                points=opts.grid_points, metric=opts.metric or None,
                                which=opts.which, overrides=[*row_overrides, *overrides],
                                seed=opts.search_seed,
                                prune=not opts.no_prune)
    if best is None:
      print(f"{row}: no trial finished; see {out}")
    else:
      print(f"{row}: best trial {best.number} ({best.value:.4g}) -> {out / 'best_overrides.txt'}\n"
            f"  {(out / 'best_overrides.txt').read_text().strip()}")
  return 0


def _analyze(args, opts) -> int:
  from jaxft.harness import analysis
  examples = [int(x) for x in opts.examples.split(",") if x.strip()]
  out = analysis.analyze_workdir(args.experiment, split=opts.split, examples=examples,
                                 out_dir=opts.out or None)
  print(f"analysis written to {out}")
  return 0


def main(args, rest: list[str]) -> int:
  """args.experiment: the experiment file (or, with --analyze, a workdir); rest: flags + overrides."""
  flags, override_args = _split_flags_and_overrides(list(rest))
  opts = build_parser().parse_args(flags)
  overrides = config_lib.parse_overrides(override_args)
  if opts.docs:
    from jaxft.harness import docs
    if overrides:
      raise ValueError("--docs takes no --config overrides: it reads the published tables")
    target = getattr(args, "experiment", None) or "docs/results.md"
    changed = docs.assemble(target)
    print(f"{target}: {len(changed)} table(s) refreshed ({', '.join(changed) or 'none'})")
    return 0
  if not getattr(args, "experiment", None):
    raise ValueError("jaxft table needs an experiment file (e.g. experiments/glue_small.py), or "
                     "--docs")
  if opts.analyze:
    if overrides:
      raise ValueError("--analyze takes no --config overrides (the workdir's config is used)")
    return _analyze(args, opts)
  return _table(args, opts, overrides)


if __name__ == "__main__":
  _p = argparse.ArgumentParser(prog="python -m jaxft.harness.cli")
  _p.add_argument("experiment", nargs="?")
  _args, _rest = _p.parse_known_args()
  sys.exit(main(_args, _rest))
