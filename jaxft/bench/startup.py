"""Startup time of `jaxft train`: from process start to the first train step, phase by phase.

    python -m jaxft.bench.startup --config experiments/quickstart.py            # 2 runs: cold, warm
    python -m jaxft.bench.startup --config experiments/quickstart.py --runs 3 --fresh-cache
    python -m jaxft.bench.startup --config experiments/quickstart.py --no-eval -- --config.seed=1

Each run is a fresh `python -m jaxft.bench.startup --child ...` process that calls the very
`jaxft.cli.main(["train", ...])` a user runs (so the CLI's compile-cache hook applies), in a new
temporary workdir, and stops it after the first train step (and, unless --no-eval, after one
evaluation of the eval split, which compiles every eval shape). The parent takes the time at which
it starts the child as t = 0, so interpreter start and imports count. The child wraps (times, never
changes) the setup's stages and reads JAX's own monitoring events for trace / lower / compile time
and persistent-cache hits:

  imports     jaxft.cli, jax, flax, optax, transformers loaded
  tokenizer   transformers AutoTokenizer of model.name
  data        jaxft.data.pipeline.build: read, tokenize (or the tokenization cache), batch plan
  model       checkpoint load into the Flax model
  build       jaxft.train.build: objective, optimizer, TrainState
  first step  the first train step returned (trace + compile or cache load + one execution)
  eval        one Evaluator.evaluate: every eval shape traced, compiled (or loaded) and run

--fresh-cache starts the first run with an empty compile cache (a temporary JAXFT_COMPILE_CACHE),
which the later runs then reuse: run 1 is the cold start, run 2 the warm one. Without it the
runs use the cache the CLI would (jaxft.core.compile_cache). Output: one table of seconds since
process start per stage, and with --json the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[2]
STAGES = ("imports", "tokenizer", "data", "model", "build", "first_step", "second_step", "eval")
# JAX monitoring events summed per run (seconds), and the cache counters.
JAX_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
              "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
              "/jax/core/compile/backend_compile_duration": "compile_s",
              "/jax/compilation_cache/cache_retrieval_time_sec": "cache_read_s"}
JAX_COUNTS = {"/jax/compilation_cache/cache_hits": "cache_hits",
              "/jax/compilation_cache/cache_misses": "cache_misses"}


class _Stop(Exception):
  """Ends the child's training run once the stages are timed."""


def _child(args, rest) -> int:
  t_spawn = float(os.environ["JAXFT_STARTUP_T0"])
  marks: dict[str, float] = {}
  sums = {v: 0.0 for v in JAX_EVENTS.values()}
  counts = {v: 0 for v in JAX_COUNTS.values()}
  compiles: list[tuple[str, float]] = []

  def mark(name):
    marks[name] = time.time() - t_spawn

  from jaxft import cli  # noqa: F401 - the entry point's own imports first
  import jax
  from jax._src import monitoring
  import flax  # noqa: F401
  import optax  # noqa: F401
  import transformers  # noqa: F401
  mark("imports")

  def on_duration(event, duration, **kw):
    if event in JAX_EVENTS:
      sums[JAX_EVENTS[event]] += duration
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append((kw.get("fun_name", ""), duration))

  def on_event(event, **kw):
    if event in JAX_COUNTS:
      counts[JAX_COUNTS[event]] += 1

  monitoring.register_event_duration_secs_listener(on_duration)
  monitoring.register_event_listener(on_event)

  from jaxft.data import pipeline
  from jaxft.train import compress, loop
  from jaxft.train import setup as setup_lib
  from jaxft.train.evaluate import Evaluator

  def timed(owner, name, stage):
    fn = getattr(owner, name)

    def wrapper(*a, **kw):
      out = fn(*a, **kw)
      mark(stage)
      return out

    setattr(owner, name, wrapper)

  timed(setup_lib, "load_tokenizer", "tokenizer")
  timed(pipeline, "build", "data")
  timed(compress, "load_model", "model")
  timed(setup_lib, "build", "build")
  original_setup = loop.build_setup

  def build_setup(config, devices=None):
    s = original_setup(config, devices=devices)
    step_fn, calls = s.step_fn, [0]

    def step(state, batch, rng):
      state, metrics = step_fn(state, batch, rng)
      jax.block_until_ready(metrics)
      calls[0] += 1
      if calls[0] == 1:
        mark("first_step")
        return state, metrics
      mark("second_step")
      if not args.no_eval:
        Evaluator(s).evaluate(state)
        mark("eval")
      raise _Stop

    s.step_fn = step
    return s

  loop.build_setup = build_setup
  workdir = tempfile.mkdtemp(prefix="jaxft-startup-")
  try:
    cli.main(["train", "--config", args.config, "--workdir", workdir, *rest])
  except _Stop:
    pass
  print("STARTUP " + json.dumps({"marks": marks, **sums, **counts,
                                 "compiles": sorted(compiles, key=lambda c: -c[1])[:8]}),
        flush=True)
  return 0


def run_once(args, rest, env) -> dict:
  env = {**env, "PYTHONPATH": os.pathsep.join(
      p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)}
  cmd = [sys.executable, "-m", "jaxft.bench.startup", "--child", "--config", args.config]
  if args.no_eval:
    cmd.append("--no-eval")
  t0 = time.time()
  env["JAXFT_STARTUP_T0"] = repr(t0)
  proc = subprocess.run(cmd + ["--", *rest], capture_output=True, text=True, env=env)
  wall = time.time() - t0
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith("STARTUP "):
      return {**json.loads(line[len("STARTUP "):]), "wall_s": wall}
  raise RuntimeError(f"startup child exited with {proc.returncode}:\n{proc.stderr[-3000:]}")


def render(rows: list[dict]) -> str:
  head = "| run | " + " | ".join(STAGES) + " | process | trace s | lower s | compile s | cache hits / misses |"
  lines = [head, "|" + " --- |" * (len(STAGES) + 6)]
  for i, r in enumerate(rows, 1):
    cells = [f"{r['marks'][s]:.1f}" if s in r["marks"] else "-" for s in STAGES]
    lines.append(f"| {i} | " + " | ".join(cells) + f" | {r['wall_s']:.1f} | {r['trace_s']:.1f} | "
                 f"{r['lower_s']:.1f} | {r['compile_s']:.1f} | {r['cache_hits']} / "
                 f"{r['cache_misses']} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxft.bench.startup", description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="experiments/quickstart.py")
  p.add_argument("--runs", type=int, default=2)
  p.add_argument("--fresh-cache", action="store_true",
                 help="run 1 starts with an empty compile cache, the later runs reuse it")
  p.add_argument("--no-eval", action="store_true", help="stop after the first train steps")
  p.add_argument("--json", default=None)
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  argv = list(sys.argv[1:] if argv is None else argv)
  rest = []
  if "--" in argv:  # config overrides for `jaxft train`
    i = argv.index("--")
    argv, rest = argv[:i], argv[i + 1:]
  args = p.parse_args(argv)
  if args.child:
    return _child(args, rest)
  env = dict(os.environ)
  tmp = None
  if args.fresh_cache:
    tmp = tempfile.mkdtemp(prefix="jaxft-compile-cache-")
    env["JAXFT_COMPILE_CACHE"] = tmp
  rows = []
  for i in range(args.runs):
    rows.append(run_once(args, rest, env))
    r = rows[-1]
    print(f"run {i + 1}: first step at {r['marks'].get('first_step', float('nan')):.1f} s, "
          f"process {r['wall_s']:.1f} s; " + ", ".join(f"{k} {v:.1f}" for k, v in r["marks"].items()),
          flush=True)
  print(render(rows))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
