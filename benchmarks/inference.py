"""Inference speed of finished workdirs: examples/s of the evaluated forward over their eval split.

    python benchmarks/inference.py workdirs/cpu/baseline workdirs/cpu/kd-half [--repeats 3]

For each workdir: load its best checkpoint (the weights `jaxft eval` scores: EMA/SWA, pruning
masks and distilled students as trained), run the jitted eval forward over the whole eval split
once to compile every bucket shape, then time `--repeats` more passes (device results fetched to
the host, as evaluation does). Prints a Markdown table: parameters, accuracy, examples/s. Run it on
an otherwise idle machine: other processes change the numbers.
"""

from __future__ import annotations

import argparse
import time


def measure(workdir: str, repeats: int) -> dict:
  import jax
  from jaxft.train.evaluate import Evaluator
  from jaxft.train.restore import load_workdir
  setup, state = load_workdir(workdir)
  ev = Evaluator(setup)
  ev.logits_and_labels(state)  # compile every bucket shape
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    logits, _ = ev.logits_and_labels(state)
    times.append(time.perf_counter() - t0)
  n = len(logits)
  params = sum(x.size for x in jax.tree_util.tree_leaves(
      setup.eval_params(state.trainable, state.frozen, state.extras)))
  return {"workdir": workdir, "params": params, "examples": n, "metrics": ev.evaluate(state),
          "examples_per_s": n / min(times), "device": str(jax.devices()[0].device_kind)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("workdirs", nargs="+")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)
  rows = [measure(w, args.repeats) for w in args.workdirs]
  print(f"device: {rows[0]['device']}; best of {args.repeats} passes over the eval split\n")
  print("| workdir | params | accuracy | examples/s |")
  print("| --- | ---: | ---: | ---: |")
  for r in rows:
    acc = r["metrics"].get("accuracy", float("nan"))
    print(f"| {r['workdir']} | {r['params'] / 1e6:.1f}M | {100 * acc:.2f} | "
          f"{r['examples_per_s']:.0f} |")


if __name__ == "__main__":
  main()
