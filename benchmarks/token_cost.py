"""What one computed token costs: the jaxft train step against Hugging Face PyTorch, same model.

    python benchmarks/token_cost.py                                  # MiniLM-L6, 32 x 64, CPU
    python benchmarks/token_cost.py --variants jaxft,jaxft-rbg,reference-nad,torch,torch-nad
    python benchmarks/token_cost.py --xla= --xla=--xla_cpu_use_xnnpack=false   # a child per set

The model is the quickstart's: sentence-transformers/all-MiniLM-L6-v2 (the `minilm-l6` asset;
BERT, 6 layers, hidden 384) with a fresh 2-label head, float32, on both sides from the same
checkpoint. Batches are full rows of random token ids (B x S real tokens, no padding), so both
sides compute exactly B x S tokens. Steps:
  jaxft*      the step `jaxft train` runs (jaxft.train.build.build from base_config(): AdamW,
              weight decay 0.01, clipping 1.0, the NaN guard; a constant learning rate), jitted
              with donation (jaxft.train.mesh.jit_step through throughput.jit_counted).
  reference*  benchmarks/reference_step.py, a plain Flax BERT step (~120 lines) of the same
              model shape with random weights (the same work; it has no attention dropout).
  torch*      transformers.BertForSequenceClassification (SDPA attention), model.train(),
              loss.backward(), clip_grad_norm_(1.0), torch.optim.AdamW(weight_decay=0.01).
Suffixes: -nad no attention-probability dropout (hidden dropout 0.1 stays), -nodrop no dropout
at all, -rbg / -unsafe_rbg the dropout keys' PRNG (jaxft's train.rng_impl; default threefry2x32).
Without a suffix the dropout is the checkpoint's (hidden 0.1, attention 0.1): the quickstart.

Timing: every variant is compiled / warmed first, then `--rounds` rounds each time `--steps`
consecutive steps of every variant in turn (so a load change on a shared machine hits all of
them alike); a variant's step time is the median over rounds. "vs torch" compares a variant with
the torch row of the same dropout. `--xla=SET` (repeated) runs the whole measurement once per XLA_FLAGS
set, each in its own process (flags are read when the backend starts); the torch rows of each
process are that process's own yardstick.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

DEFAULT_VARIANTS = ("torch", "jaxft", "jaxft-rbg", "torch-nad", "jaxft-nad", "reference-nad",
                    "torch-nodrop", "jaxft-nodrop")


def dropouts(variant: str) -> tuple[float, float]:
  """(hidden, attention) dropout of a variant name."""
  if variant.endswith("-nodrop"):
    return 0.0, 0.0
  if "-nad" in variant:
    return 0.1, 0.0
  return 0.1, 0.1


def rng_impl(variant: str) -> str:
  for impl in ("unsafe_rbg", "rbg"):
    if variant.endswith("-" + impl) or f"-{impl}-" in variant:
      return impl
  return "threefry2x32"


def model_dir() -> str:
  from jaxft import assets
  return str(assets.fetch("minilm-l6"))


def batch_np(seed: int, seq: int, batch: int, vocab: int) -> dict:
  rng = np.random.default_rng(seed)
  return {"input_ids": rng.integers(1000, vocab, (batch, seq), dtype=np.int32),
          "attention_mask": np.ones((batch, seq), np.int32),
          "token_type_ids": np.zeros((batch, seq), np.int32),
          "example_mask": np.ones((batch,), np.float32),
          "labels": rng.integers(0, 2, (batch,), dtype=np.int32)}


class JaxftRunner:
  """The jaxft step of one variant, compiled, with its own state and two device batches."""

  def __init__(self, variant: str, seq: int, batch: int):
    import jax
    from types import SimpleNamespace
    from jaxft.bench import throughput as tp
    from jaxft.models import from_pretrained
    from jaxft.train import mesh as mesh_lib
    from jaxft.train.build import build
    hidden, attention = dropouts(variant)
    model = from_pretrained(model_dir(), head="sequence_classification", num_labels=2,
                            hidden_dropout=hidden, attention_dropout=attention,
                            load_tokenizer=False)
    config = tp.kind_config("supervised", lr=1e-4)
    config.train.rng_impl = rng_impl(variant)
    built = build(config, model, tp.task_info(), total_steps=10_000)
    fn, self.state, self.count, mesh = tp.jit_counted(
        built.step, built.state, SimpleNamespace(donate=True))
    self.batches = [mesh_lib.put_batch(batch_np(i, seq, batch, model.config.vocab_size), mesh)
                    for i in range(2)]
    self.key = jax.random.key(0, impl=config.train.rng_impl)
    t0 = time.perf_counter()
    self.fn = fn.lower(self.state, self.batches[0], self.key).compile()
    self.compile_s = time.perf_counter() - t0
    self.i = 0

  def run(self, n: int) -> float:
    import jax
    t0 = time.perf_counter()
    for _ in range(n):
      self.state, metrics = self.fn(self.state, self.batches[self.i % 2], self.key)
      self.i += 1
    jax.block_until_ready(metrics)
    self.loss = float(metrics["loss"])
    return time.perf_counter() - t0


class ReferenceRunner(JaxftRunner):
  """benchmarks/reference_step.py at MiniLM-L6's shape (random weights, hidden dropout only)."""

  def __init__(self, variant: str, seq: int, batch: int):
    import jax
    import jax.numpy as jnp
    import reference_step as ref
    hidden, _ = dropouts(variant)
    cfg = ref.Cfg(vocab=30522, hidden=384, layers=6, heads=12, inter=1536, dropout=hidden,
                  dtype=jnp.float32)
    step, self.state = ref.build(cfg, seq, total_steps=10_000, lr=1e-4)
    self.batches = [{k: jnp.asarray(v) for k, v in batch_np(i, seq, batch, cfg.vocab).items()}
                    for i in range(2)]
    self.key = jax.random.key(0, impl=rng_impl(variant))
    t0 = time.perf_counter()
    self.fn = jax.jit(step, donate_argnums=0).lower(self.state, self.batches[0], self.key).compile()
    self.compile_s = time.perf_counter() - t0
    self.i = 0


class TorchRunner:
  """Hugging Face BertForSequenceClassification from the same checkpoint, eager PyTorch."""

  def __init__(self, variant: str, seq: int, batch: int):
    import torch
    from transformers import BertForSequenceClassification
    hidden, attention = dropouts(variant)
    torch.manual_seed(0)
    self.model = BertForSequenceClassification.from_pretrained(
        model_dir(), num_labels=2, attn_implementation="sdpa", hidden_dropout_prob=hidden,
        attention_probs_dropout_prob=attention)
    self.model.train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01)
    self.batches = [{k: torch.from_numpy(v).long() for k, v in batch_np(i, seq, batch, 30522).items()
                     if k != "example_mask"} for i in range(2)]
    self.compile_s = 0.0
    self.i = 0

  def run(self, n: int) -> float:
    import torch
    t0 = time.perf_counter()
    for _ in range(n):
      loss = self.model(**self.batches[self.i % 2]).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
      self.opt.step()
      self.opt.zero_grad(set_to_none=True)
      self.i += 1
    self.loss = float(loss.detach())
    return time.perf_counter() - t0


def runner(variant: str, seq: int, batch: int):
  kind = variant.split("-")[0]
  cls = {"jaxft": JaxftRunner, "reference": ReferenceRunner, "torch": TorchRunner}.get(kind)
  if cls is None:
    raise ValueError(f"unknown variant {variant!r}: it starts with jaxft, reference or torch")
  return cls(variant, seq, batch)


def measure(args) -> list[dict]:
  import jax
  import torch
  runners = {}
  for v in args.variants:
    t0 = time.perf_counter()
    runners[v] = runner(v, args.seq, args.batch)
    runners[v].run(args.warmup)
    print(f"[{time.perf_counter() - t0:5.1f}s] {v}: ready (compile {runners[v].compile_s:.1f}s)",
          file=sys.stderr, flush=True)
  times = {v: [] for v in runners}
  for r in range(args.rounds):
    for v, run in runners.items():
      times[v].append(run.run(args.steps) / args.steps)
  rows = []
  tokens = args.seq * args.batch
  for v, ts in times.items():
    step = statistics.median(ts)
    rows.append({"variant": v, "xla_flags": os.environ.get("XLA_FLAGS", ""), "seq": args.seq,
                 "batch": args.batch, "step_s": step, "min_s": min(ts), "tokens_per_s": tokens / step,
                 "loss": runners[v].loss, "compile_s": runners[v].compile_s,
                 "torch_threads": torch.get_num_threads(), "jax_devices": str(jax.devices())})
  for r in rows:
    match = next((o for o in rows if o["variant"].startswith("torch")
                  and dropouts(o["variant"]) == dropouts(r["variant"])), None)
    if match and not r["variant"].startswith("torch"):
      r["vs_torch"] = r["step_s"] / match["step_s"]
  return rows


def render(rows: list[dict]) -> str:
  lines = ["| XLA_FLAGS | variant | ms / step | best ms | tokens/s | time vs torch (same dropout) |",
           "| --- | --- | ---: | ---: | ---: | ---: |"]
  for r in rows:
    lines.append(f"| {r['xla_flags'] or '(none)'} | {r['variant']} | {r['step_s'] * 1e3:.1f} | "
                 f"{r['min_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
                 f"{'-' if 'vs_torch' not in r else format(r['vs_torch'], '.3f') + 'x'} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seq", type=int, default=64)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--xla", action="append", default=None, metavar="=FLAGS",
                 help="an XLA_FLAGS set (--xla=--a=1 --b=2; --xla= for none), one child each; "
                 "repeat for several")
  p.add_argument("--jsonl", default=None, help="append the rows here")
  args = p.parse_args(argv)
  args.variants = [v for v in args.variants.split(",") if v]
  if args.xla is not None:
    rows = []
    child = [a for a in (argv if argv is not None else sys.argv[1:])
             if not a.startswith("--xla=") and a != "--jsonl" and not a.endswith(".jsonl")]
    for flags in args.xla:
      env = {**os.environ, "XLA_FLAGS": flags}
      proc = subprocess.run([sys.executable, __file__, *child, "--jsonl", "/dev/stdout"], env=env,
                            capture_output=True, text=True)
      got = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
      if not got:
        print(f"XLA_FLAGS={flags!r}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
      rows += got
      print(render(got), flush=True)
  else:
    rows = measure(args)
  if args.jsonl:
    with open(args.jsonl, "a") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
  if args.xla is None and args.jsonl == "/dev/stdout":
    return 0
  print(render(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
