"""The memory XLA plans for a step, without running it: LoRA against full fine-tuning.

    python benchmarks/diag/memory_plan.py [--kinds supervised,lora] [--seq 128] [--batch 64]

Builds each step kind the way benchmarks/throughput.py does (BERT-base, bf16 compute, float32
params, AdamW, donated state), compiles it for the local backend and prints XLA's buffer plan:
arguments (params, optimizer state, batch), temporaries (activations kept for the backward pass,
gradients, workspace) and their total less what donation aliases. On a CPU this is the CPU
compiler's plan, which fuses differently from the GPU's, so read the ratio between kinds, not the
bytes; the peak device memory on a GPU comes from benchmarks/throughput.py.
"""
from __future__ import annotations

import argparse
import pathlib
import runpy
import sys
from types import SimpleNamespace

import numpy as np

HERE = pathlib.Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--kinds", default="supervised,lora")
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--remat", action="store_true", help="rematerialise each layer (nn.remat)")
  p.add_argument("--tiny", action="store_true", help="the 2-layer hidden-32 model (tests)")
  a = p.parse_args(argv)
  import jax
  from jaxft.train import mesh as mesh_lib
  ns = runpy.run_path(str(HERE / "throughput.py"), run_name="bench")
  args = SimpleNamespace(tiny=a.tiny, attention_dropout=0.0, dtype=a.dtype, attention="xla",
                         remat=a.remat, donate=True)
  cfg = ns["bert_config"](args)
  print(f"BERT {'tiny' if a.tiny else 'base'}, seq {a.seq} x batch {a.batch}, {a.dtype} compute, "
        f"{'remat, ' if a.remat else ''}backend {jax.default_backend()}")
  print("| kind | trainable params | arguments MB | temporaries MB | total - aliased MB "
        "| vs first |")
  print("| --- | ---: | ---: | ---: | ---: | ---: |")
  first = None
  for kind in a.kinds.split(","):
    step, state, unlabeled = ns["build_kind"](kind, cfg, args, 100, {})
    batch = ns["kind_batch"](kind, np.random.default_rng(0), a.seq, a.batch, cfg.vocab_size,
                             unlabeled)
    fn, state, _, mesh = ns["jit_counted"](step, state, args)
    compiled = fn.lower(state, mesh_lib.put_batch(batch, mesh), jax.random.key(0)).compile()
    m = compiled.memory_analysis()
    total = ns["compiled_bytes"](compiled)
    first = first or total
    n = sum(int(np.prod(v.shape)) for v in state.trainable.values())
    print(f"| {kind} | {n:,} | {m.argument_size_in_bytes / 2**20:.1f} | "
          f"{m.temp_size_in_bytes / 2**20:.1f} | {total / 2**20:.1f} | {total / first:.2f}x |",
          flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
