"""`jaxft table`: grid x seeds -> table.md / table.tex / table.csv / curves.png / bars.png;
with --search, a hyperparameter search per row; with --analyze, a report on one finished workdir.

    jaxft table experiments/glue_small.py --seeds 5                 # the whole table
    jaxft table experiments/glue_small.py --seeds 2 --only rte,mrpc --config.train.num_steps=50
    jaxft table experiments/glue_small.py --dry-run                 # list the runs and their state
    jaxft table experiments/glue_small.py --search random --trials 8 --only rte
    jaxft table experiments/glue_small.py --search bayes --trials 20 --only rte   # TPE + pruning
    jaxft table workdirs/glue_small/rte/seed0 --analyze --examples 0,1,2

`jaxft.cli` parses the subcommand and the positional experiment; `main(args, rest)` parses the rest.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from jaxft import config as config_lib
from jaxft.harness import aggregate, grid, plots, tables


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxft table", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seeds", default="1", help="number of seeds (0..N-1) or a list: 0,3,7")
  p.add_argument("--only", default="", help="comma-separated GRID rows to run (default: all)")
  p.add_argument("--workdir-root", default="", help="default: workdirs/<experiment file stem>")
  p.add_argument("--metric", default="", help="metric to tabulate (default: each row's main metric "
                 "plus the ones PAPER names)")
  p.add_argument("--which", choices=("eval", "best"), default="eval",
                 help="eval: metrics at the end of training; best: at the best eval")
  p.add_argument("--units", choices=("auto", "raw", "percent"), default="auto",
                 help="auto: x100 where the paper reports percent and ours are fractions")
  p.add_argument("--digits", type=int, default=2)
  p.add_argument("--dry-run", action="store_true", help="list the runs and their state; run nothing")
  p.add_argument("--no-run", action="store_true", help="aggregate the finished runs only")
  p.add_argument("--keep-going", action="store_true",
                 help="a failing run is reported and the grid goes on (rerun to resume it)")
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


def _root(args, opts) -> pathlib.Path:
  if opts.workdir_root:
    return pathlib.Path(opts.workdir_root)
  return pathlib.Path("workdirs") / pathlib.Path(args.experiment).stem


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


def aggregate_and_write(module, runs, root: pathlib.Path, opts, stream=sys.stdout) -> list:
  """Tables and plots over whatever runs have finished; prints the Markdown table."""
  results = grid.collect(runs)
  missing = [r.name for r in runs if aggregate.read_results(r.workdir) is None]
  cells = aggregate.build_cells(results, getattr(module, "PAPER", None), opts.metric or None,
                                opts.which, opts.units)
  title = f"{pathlib.Path(module.__file__).stem}" + (f" ({len(missing)} runs missing)" if missing
                                                      else "")
  paths = tables.write_all(cells, root, title=title, digits=opts.digits)
  by_row: dict[str, list] = {}
  for r in runs:
    by_row.setdefault(r.row, []).append(r.workdir)
  curves = plots.learning_curves(by_row, root / "curves.png", opts.metric or None)
  bars = plots.bar_chart(cells, root / "bars.png")
  print(paths["md"].read_text(), file=stream)
  written = [str(p) for p in (*paths.values(), curves, bars) if p is not None]
  print("wrote " + ", ".join(written), file=stream)
  return cells


def _table(args, opts, overrides) -> int:
  module = grid.load_module(args.experiment)
  rows = grid.select_rows(grid.grid_of(module, args.experiment),
                          [r for r in opts.only.split(",") if r])
  root = _root(args, opts)
  if opts.search:
    return _search(args, opts, overrides, module, rows, root)
  runs = grid.plan(args.experiment, rows, grid.parse_seeds(opts.seeds), root, overrides)
  if opts.dry_run:
    for r in runs:
      print(f"{r.status():8s} {r.name:24s} {r.workdir}  jaxft {' '.join(r.cli_args())}")
    return 0
  for r in runs:  # fail on a bad override or GRID arg now, not after hours of other runs
    r.config()
  if not opts.no_run:
    try:
      grid.run_grid(runs, keep_going=opts.keep_going)
    except Exception as e:  # noqa: BLE001
      if not grid.is_preemption(e):
        raise
      print(f"{e}\nthe grid stopped; run the same command again to resume it", file=sys.stderr)
      return 0
  aggregate_and_write(module, runs, root, opts)
  return 0


def _search(args, opts, overrides, module, rows, root) -> int:
  from jaxft.harness import search as search_lib
  space = getattr(module, "SEARCH", None)
  if not space:
    raise ValueError(f"{args.experiment} defines no SEARCH = {{'train.learning_rate': "
                         "('log_uniform', 1e-5, 1e-3), ...}; --search needs one")
  params = search_lib.parse_space(space)
  for row, arg in rows.items():
    spec = f"{args.experiment}:{arg}" if arg not in (None, "") else str(args.experiment)
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
                                which=opts.which, overrides=overrides, seed=opts.search_seed,
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
  if opts.analyze:
    if overrides:
      raise ValueError("--analyze takes no --config overrides (the workdir's config is used)")
    return _analyze(args, opts)
  return _table(args, opts, overrides)


if __name__ == "__main__":
  _p = argparse.ArgumentParser(prog="python -m jaxft.harness.cli")
  _p.add_argument("experiment")
  _args, _rest = _p.parse_known_args()
  sys.exit(main(_args, _rest))
