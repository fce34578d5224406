"""What the jaxft train step asks the matmul units to do, read from its jaxpr (no device needed).

    python benchmarks/diag/dot_census.py [--kind supervised] [--seq 128] [--batch 64] [--tiny]

Traces the step that benchmarks/throughput.py times (BERT-base, bf16 compute, float32 params,
AdamW) and walks its jaxpr, forward and backward, into every nested jaxpr. For each dot_general it
records the operand dtypes and the FLOPs (2 x batch x M x N x K), and it sums the random bits the
dropout draws. Printed: FLOPs by (lhs, rhs -> result) dtype, their total against the model-FLOPs
formula of throughput.py (matmuls only, 3x forward), the largest dots that do not run bf16 x bf16,
and the dropout bits. A GPU only reaches its bf16 tensor-core rate on bf16 x bf16 dots; a dot with
a float32 operand runs at the float32 rate (about 1/12 of it on an H100), so this is the first check
when a step is far slower than its FLOPs say.
"""
from __future__ import annotations

import argparse
import collections
import pathlib
import runpy
import sys
from types import SimpleNamespace

import numpy as np

HERE = pathlib.Path(__file__).resolve().parents[1]


def sub_jaxprs(eqn):
  """Every jaxpr nested in an equation's params (pjit, custom_vjp, scan, cond, remat...)."""
  from jax.extend import core
  for v in eqn.params.values():
    for x in (v if isinstance(v, (list, tuple)) else (v,)):
      if isinstance(x, core.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, core.Jaxpr):
        yield x


def dot_flops(eqn) -> float:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  batch = np.prod([lhs[d] for d in lb], dtype=np.float64)
  k = np.prod([lhs[d] for d in lc], dtype=np.float64)
  m = np.prod([s for d, s in enumerate(lhs) if d not in lc and d not in lb], dtype=np.float64)
  n = np.prod([s for d, s in enumerate(rhs) if d not in rc and d not in rb], dtype=np.float64)
  return 2.0 * batch * m * n * k


def census(jaxpr, dots: list, bits: list, times: int = 1) -> None:
  """Appends (flops, dtypes, shapes) per dot and the random bits drawn; `times`: loop trips."""
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      lhs, rhs = (v.aval for v in eqn.invars)
      key = f"{lhs.dtype} x {rhs.dtype} -> {eqn.outvars[0].aval.dtype}"
      dots.append((dot_flops(eqn) * times, key, (lhs.shape, rhs.shape)))
    elif name in ("random_bits", "threefry2x32", "rng_bit_generator"):
      out = eqn.outvars[0].aval
      bits.append((name, int(np.prod(out.shape)) * out.dtype.itemsize * 8 * times))
    trips = eqn.params.get("length", 1) if name == "scan" else 1
    for sub in sub_jaxprs(eqn):
      census(sub, dots, bits, times * trips)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--kind", default="supervised", help="a benchmarks/throughput.py step kind")
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--tiny", action="store_true", help="the 2-layer hidden-32 model (tests)")
  p.add_argument("--top", type=int, default=8)
  a = p.parse_args(argv)
  import jax
  ns = runpy.run_path(str(HERE / "throughput.py"), run_name="bench")
  args = SimpleNamespace(tiny=a.tiny, attention_dropout=0.0, dtype=a.dtype, attention="xla",
                         remat=False, donate=True)
  cfg = ns["bert_config"](args)
  step, state, unlabeled = ns["build_kind"](a.kind, cfg, args, 100, {})
  batch = ns["kind_batch"](a.kind, np.random.default_rng(0), a.seq, a.batch, cfg.vocab_size,
                           unlabeled)
  closed = jax.make_jaxpr(step)(state, batch, jax.random.key(0))
  dots, bits = [], []
  census(closed.jaxpr, dots, bits)

  total = sum(f for f, _, _ in dots)
  model = ns["train_flops"](cfg, a.seq, a.batch)
  print(f"{a.kind} step, BERT {'tiny' if a.tiny else 'base'}, seq {a.seq} x batch {a.batch}, "
        f"compute {a.dtype}: {len(dots)} dot_generals, {total / 1e12:.3f} TFLOP "
        f"({total / model:.2f}x the model-FLOPs formula, {model / 1e12:.3f} TFLOP)")
  by = collections.defaultdict(lambda: [0, 0.0])
  for f, key, _ in dots:
    by[key][0] += 1
    by[key][1] += f
  print("| operands -> result | dots | TFLOP | share |\n| --- | ---: | ---: | ---: |")
  for key, (n, f) in sorted(by.items(), key=lambda kv: -kv[1][1]):
    print(f"| {key} | {n} | {f / 1e12:.4f} | {100 * f / total:.2f}% |")
  low = a.dtype in ("bfloat16", "float16")
  off = sorted((d for d in dots if low and not d[1].startswith(f"{a.dtype} x {a.dtype}")),
               key=lambda d: -d[0])
  if off:
    print(f"largest dots with an operand not in {a.dtype}:")
    for f, key, shapes in off[:a.top]:
      print(f"  {f / 1e9:9.3f} GFLOP  {key}  {shapes[0]} x {shapes[1]}")
  drawn = sum(b for _, b in bits)
  print(f"random bits drawn: {drawn / 8e6:.1f} MB in {len(bits)} draws")
  return 0


if __name__ == "__main__":
  sys.exit(main())
