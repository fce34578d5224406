"""Inference speed of finished workdirs: examples/s of the evaluated forward over their eval split.

    python benchmarks/inference.py workdirs/cpu/baseline workdirs/cpu/kd-half [--repeats 3]

For each workdir: load its best checkpoint (the weights `jaxft eval` scores: EMA/SWA, pruning
masks and distilled students as trained) and time its forward with
`jaxft.train.evaluate.inference_speed` (one pass compiles every bucket shape, then the best of
`--repeats` passes). Prints a Markdown table: parameters, accuracy, examples/s. A grid row gets
the same number in its table with `Row(..., evaluate={"speed_passes": 3})`. Run it on an
otherwise idle machine: other processes change the numbers.
"""

from __future__ import annotations

import argparse


def measure(workdir: str, repeats: int) -> dict:
  import jax
  from jaxft.train.evaluate import Evaluator, inference_speed
  from jaxft.train.restore import load_workdir
  setup, state = load_workdir(workdir)
  speed = inference_speed(setup, state, passes=repeats)
  return {"workdir": workdir, **speed, "metrics": Evaluator(setup).evaluate(state),
          "device": str(jax.devices()[0].device_kind)}


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
