"""Training throughput: the jaxft train step against Hugging Face PyTorch, on the same device.

    jaxft bench                                           # BERT-base, seq 128 x batch 64 and 512 x 16
    jaxft bench --shapes 128x64 --kinds supervised,lora
    jaxft bench --tiny                                    # CPU smoke configuration (CI)
    python benchmarks/throughput.py ...                   # the same from a source checkout

One run measures, for each shape (sequence length x batch size):
  - peak: the device's dense matmul rate, timed here on a large matmul in the compute dtype
    (--peak-size, 8192 for bf16 on GPU); MFU = model FLOPs / step time / peak.
  - torch eager / torch.compile: transformers.BertForSequenceClassification, random init,
    attn_implementation="sdpa", fp32 master weights under torch.autocast(bf16), global-norm
    clipping 1.0 and torch.optim.AdamW(fused=True on CUDA): the Hugging Face Trainer's --bf16 step.
  - jaxft step kinds: the step `jaxft train` runs for that kind's config, from the one step
    builder `jaxft.train.build.build` (base_config(): AdamW, clipping 1.0, the NaN guard; a
    constant learning rate), jitted with `jaxft.train.mesh.jit_step` (donated state, explicit
    shardings). Kinds: supervised, lora (r = 8 on query/value, `jaxft.peft`), uda, fixmatch (an
    unlabeled part of the same size), fgm, pgd (3 steps), freelb (3 steps), smart, vat, rdrop,
    distill (a teacher of the same size, a student with half the layers, logit KD), prune
    (movement pruning, global top-k every 100 steps). A kind whose module does not import is
    listed as "not available".
  - host: the input pipeline, building bucketed numpy batches with `jaxft.data.batching` from a
    synthetic length distribution (lognormal, median S/3); its time per batch against the step
    time, the padding fraction, and the supervised step run over those buckets, checking it traced
    exactly once per bucket shape.
Tokens/s counts the labeled batch (B x S) for every kind, so "vs supervised" is a step-time ratio.
Model FLOPs per training step (Kaplan et al. 2020 / PaLM's MFU convention: matmuls only, 3x forward,
remat recomputation not counted): 3 * B * [S * L * (8 H^2 + 4 H I + 4 S H) + 2 H^2 + 2 H C].

Peak memory: jax `device.memory_stats()["peak_bytes_in_use"]` and torch
`torch.cuda.max_memory_allocated()`. The JAX peak only grows within a process, so on accelerators
every measurement runs in its own child process (--isolate, the default except --tiny); where the device
keeps no statistics (CPU), the compiled step's memory analysis (arguments + outputs + temporaries -
aliased) is reported instead, marked "~".

Speed features as flags: --dtype (compute dtype; params stay float32), --attention auto|cudnn|xla
(jax.nn.dot_product_attention implementation), --remat, --no-donate, --attention-dropout (0 by
default on both sides: with attention-probability dropout jaxft materialises the probabilities).

Imports: only jax, flax, optax, numpy, transformers and torch are needed; no ml_collections
(the run config is base_config() read by jaxft/bench/config.py), datasets or seqeval, so it
runs on a bare GPU image. Results go to --out (jaxft bench: jaxft_bench/RESULTS.md;
benchmarks/throughput.py: benchmarks/RESULTS.md) and --json; --append merges an earlier --json so
a long benchmark can be split into several runs (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time
import traceback

# JAX must not grab 75% of the GPU up front: torch shares the device in the in-process mode.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "--tiny" in sys.argv[1:]:
  # The CPU smoke run is all compile time: LLVM optimisation off halves it (set before jax loads).
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                             " --xla_llvm_disable_expensive_passes=true").strip()

import numpy as np

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[2]  # the folder holding jaxft/
DEFAULT_OUT = "jaxft_bench/RESULTS.md"
KINDS = ("supervised", "lora", "uda", "fixmatch", "fgm", "pgd", "freelb", "smart", "vat", "rdrop",
         "distill", "prune")
TINY_KINDS = ("supervised", "lora", "fgm")
TARGETS = {"speedup_128x64": 2.0, "mfu_128x64": 0.45, "speedup_512x16": 2.3, "lora_speed": 1.3,
           "lora_memory": 0.6, "host_fraction": 0.10}


# ------------------------------------------------------------------------------------------------
# Configuration


def parse_shapes(spec: str) -> list[tuple[int, int]]:
  """'128x64,512x16' -> [(128, 64), (512, 16)] as (sequence length, batch size)."""
  out = []
  for part in spec.split(","):
    try:
      s, b = part.lower().split("x")
      out.append((int(s), int(b)))
    except ValueError:
      raise ValueError(f"--shapes: {part!r} is not SEQxBATCH, e.g. 128x64") from None
  return out


def bert_config(args):
  """transformers.BertConfig: the defaults (BERT-base) or the --tiny one; 2 labels."""
  from transformers import BertConfig
  kw = dict(num_labels=2, attention_probs_dropout_prob=args.attention_dropout)
  if args.tiny:
    kw.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              vocab_size=512)
  return BertConfig(**kw)


def train_flops(cfg, seq: int, batch: int) -> float:
  """Model FLOPs of one training step (module docstring)."""
  h, i, n_layers, c = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_labels
  per_seq = seq * n_layers * (8 * h * h + 4 * h * i + 4 * seq * h) + 2 * h * h + 2 * h * c
  return 3.0 * batch * per_seq


class Options(dict):
  """A dict with attribute access: what objective factories read (`options.epsilon`, `"k" in
  options`), without ml_collections."""

  def __getattr__(self, key):
    try:
      return self[key]
    except KeyError:
      raise AttributeError(key) from None


def objective_config(name: str, **overrides) -> Options:
  """The `config.objective` shape registry.build expects: .name and [name] -> options."""
  from jaxft.objectives import registry
  opts = Options(registry.defaults()[name])
  unknown = set(overrides) - set(opts)
  if unknown:
    raise KeyError(f"objective {name!r} has no options {sorted(unknown)}; it has {sorted(opts)}")
  opts.update(overrides)
  return Options({"name": name, name: opts})


def task_info():
  from jaxft.data.tasks import TaskInfo
  return TaskInfo(name="bench", kind="classification", label_names=("neg", "pos"), num_labels=2,
                  metric_names=("accuracy",), main_metric="accuracy")


def lora_options() -> Options:
  """config.peft for LoRA r = 8 on query/value (Hu et al. 2021's GLUE setting)."""
  return Options(method="lora", freeze_layers=0, lora_rank=8, lora_alpha=16.0,
                               lora_dropout=0.0, lora_targets="query|value", rslora=False,
                               ia3_targets="key|value|output/dense", adapter_size=64,
                               prefix_length=16, prompt_length=16)


# ------------------------------------------------------------------------------------------------
# Batches


def random_batch(rng: np.random.Generator, seq: int, batch: int, vocab: int, prefix: str = "",
                 labels: bool = True) -> dict:
  """Full-length random token batch (no padding): int32 [B, S] inputs, int32 [B] labels."""
  out = {f"{prefix}input_ids": rng.integers(1, vocab, (batch, seq), dtype=np.int32),
         f"{prefix}attention_mask": np.ones((batch, seq), np.int32),
         f"{prefix}token_type_ids": np.zeros((batch, seq), np.int32),
         f"{prefix}example_mask": np.ones((batch,), np.float32)}
  if labels:
    out[f"{prefix}labels"] = rng.integers(0, 2, (batch,), dtype=np.int32)
  return out


def kind_batch(kind: str, rng, seq: int, batch: int, vocab: int, unlabeled: bool) -> dict:
  b = random_batch(rng, seq, batch, vocab)
  if unlabeled:
    b.update(random_batch(rng, seq, batch, vocab, "unlabeled/", labels=False))
    if kind == "fixmatch":
      strong = random_batch(rng, seq, batch, vocab, "unlabeled/strong/", labels=False)
      b.update({k: v for k, v in strong.items() if not k.endswith("example_mask")})
  return b


def synthetic_encoded(rng, n: int, max_len: int, vocab: int):
  """An `Encoded` split of n examples, lengths lognormal(median max_len / 3, sigma 0.6) in
  [4, max_len]: enough spread to fill several buckets."""
  from jaxft.data.tokenize import Encoded
  lengths = np.clip(np.round(rng.lognormal(math.log(max_len / 3), 0.6, n)), 4, max_len).astype(int)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  total = int(offsets[-1])
  return Encoded(input_ids=rng.integers(1, vocab, total, dtype=np.int32),
                 token_type_ids=np.zeros(total, np.int32), offsets=offsets,
                 truncated=np.zeros(n, bool), labels=rng.integers(0, 2, n).astype(np.int32),
                 pad_id=0, kind="classification")


# ------------------------------------------------------------------------------------------------
# jaxft steps


def jax_model(cfg, args, cache: dict, peft=None, num_layers=None):
  """init_random BERT with a sequence head; `cache` reuses a model across kinds in one process."""
  from jaxft.models import init_random
  key = (peft, num_layers)
  if key in cache:
    return cache[key]
  if num_layers is not None:
    cfg = cfg.__class__(**{**cfg.to_dict(), "num_hidden_layers": num_layers})
  cache[key] = init_random(cfg, head="sequence_classification", num_labels=2, dtype=args.dtype,
                     peft=peft, remat=args.remat,
                     attention_impl=None if args.attention == "auto" else args.attention,
                     attention_dropout=args.attention_dropout)
  return cache[key]


def kind_config(kind: str, lr: float = 2e-5):
  """The run config of one step kind: base_config() (AdamW, clipping 1.0, the NaN guard: what
  `jaxft train` uses) with a constant learning rate, plus the kind's own section."""
  from jaxft.bench.config import base_config
  c = base_config()
  c.train.learning_rate, c.train.warmup_ratio, c.train.schedule = lr, 0.0, "constant"
  c.objective.name = "supervised" if kind in ("lora", "distill", "prune") else kind
  if kind in ("pgd", "freelb"):
    c.objective[kind].steps = 3
  if kind == "lora":
    c.peft.update(lora_options())
  if kind == "prune":  # movement pruning, global top-k, masks every 100 steps
    c.prune.update(method="movement", final_sparsity=0.9, begin_fraction=0.0, end_fraction=1.0,
                   frequency=100)
  if kind == "distill":  # logit KD from a teacher of the same size, student of half the layers
    c.distill.update(teacher="(benchmark teacher)", alpha=0.5, temperature=2.0)
  return c


def build_kind(kind: str, cfg, args, total_steps: int, cache: dict):
  """-> (pure step, TrainState, needs_unlabeled) for one step kind, from jaxft.train.build.build:
  the step `jaxft train` runs for that config. ImportError/KeyError if the kind's module or
  registry entry is missing."""
  from jaxft import peft
  from jaxft.objectives import registry
  from jaxft.train.build import build
  from jaxft.train.compress import Teacher

  config = kind_config(kind)
  name = config.objective.name
  if name not in registry.names():
    raise KeyError(f"objective {name!r} is not registered (known: {', '.join(registry.names())})")
  teacher = None
  if kind == "lora":
    model = jax_model(cfg, args, cache, peft=peft.spec_from_config(config.peft))
  elif kind == "distill":
    model = jax_model(cfg, args, cache, num_layers=max(cfg.num_hidden_layers // 2, 1))
    teacher = Teacher(jax_model(cfg, args, cache), None)
  else:
    model = jax_model(cfg, args, cache)
  built = build(config, model, task_info(), total_steps=total_steps, teacher=teacher)
  return built.step, built.state, any(p.unlabeled for p in built.parts)


def jit_counted(step, state, args):
  """(jitted step, state on the mesh, trace counter [n]) through jaxft.train.mesh."""
  import jax
  from types import SimpleNamespace
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jaxft.train import mesh as mesh_lib
  mesh = mesh_lib.make_mesh(SimpleNamespace(data=-1, fsdp=1))
  # Fresh buffers: the step donates the state, and the models are shared between kinds.
  state = jax.tree_util.tree_map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
  state, shardings = mesh_lib.shard_state(state, mesh)
  count = [0]

  def counted(state, batch, rng):
    count[0] += 1  # runs only while tracing
    return step(state, batch, rng)

  if args.donate:
    fn = mesh_lib.jit_step(counted, mesh, shardings)
  else:
    rep = NamedSharding(mesh, P())
    fn = jax.jit(counted, in_shardings=(shardings, mesh_lib.batch_sharding(mesh), rep),
                 out_shardings=(shardings, rep))
  return fn, state, count, mesh


def device_peak_bytes():
  import jax
  stats = jax.local_devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def compiled_bytes(compiled) -> int | None:
  """Arguments + outputs + temporaries - aliased (donated) bytes of a compiled step."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:  # noqa: BLE001 - backends without memory analysis just report nothing
    return None


def time_jax_kind(kind: str, seq: int, batch: int, args, cache: dict) -> dict:
  """Compiles the kind's step once ahead of time (lower -> compile: one trace), then times it."""
  import jax
  from jaxft.train import mesh as mesh_lib
  cfg = bert_config(args)
  step, state, unlabeled = build_kind(kind, cfg, args, args.warmup + args.steps, cache)
  fn, state, count, mesh = jit_counted(step, state, args)
  rng = np.random.default_rng(0)
  batches = [mesh_lib.put_batch(kind_batch(kind, rng, seq, batch, cfg.vocab_size, unlabeled), mesh)
             for _ in range(2)]
  key = jax.random.key(0)
  t0 = time.perf_counter()
  compiled = fn.lower(state, batches[0], key).compile()
  compile_s = time.perf_counter() - t0
  for i in range(args.warmup):
    state, metrics = compiled(state, batches[i % 2], key)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for i in range(args.steps):
    state, metrics = compiled(state, batches[i % 2], key)
  jax.block_until_ready(metrics)
  dt = (time.perf_counter() - t0) / args.steps
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    raise FloatingPointError(f"{kind}: non-finite loss {loss}")
  peak, mem_src = device_peak_bytes(), "device"
  if peak is None:
    peak, mem_src = compiled_bytes(compiled), "compiled"
  return {"impl": "jaxft", "kind": kind, "step_s": dt, "peak_bytes": peak, "mem_src": mem_src,
          "loss": loss, "traces": count[0], "compile_s": compile_s}


def host_pipeline(seq: int, batch: int, args, cache: dict) -> dict:
  """Bucketed numpy batches (jaxft.data.batching): host ms per batch, padding fraction, and the
  supervised step over them (traces == distinct bucket shapes, real tokens/s)."""
  import jax
  from jaxft.data import batching
  from jaxft.train import mesh as mesh_lib
  cfg = bert_config(args)
  rng = np.random.default_rng(1)
  n_batches = max(args.steps, 8)
  enc = synthetic_encoded(rng, batch * n_batches * 2, seq, cfg.vocab_size)
  boundaries = batching.parse_boundaries(args.buckets, seq)
  batcher = batching.TrainBatcher(enc, batch_size=batch, seed=0, boundaries=boundaries)
  t0 = time.perf_counter()
  host = [batcher.batch_at(s) for s in range(n_batches)]
  host_s = (time.perf_counter() - t0) / n_batches
  plan = [batcher.indices_at(s) for s in range(n_batches)]
  pad = batching.padding_fraction(enc.lengths, plan)
  shapes = sorted({b["input_ids"].shape for b in host})

  step, state, _ = build_kind("supervised", cfg, args, 2 * n_batches, cache)
  fn, state, count, mesh = jit_counted(step, state, args)
  key = jax.random.key(0)
  for b in host:  # first pass compiles every bucket shape once
    state, metrics = fn(state, mesh_lib.put_batch(b, mesh), key)
  jax.block_until_ready(metrics)
  device = [mesh_lib.put_batch(b, mesh) for b in host]
  t0 = time.perf_counter()
  for b in device:
    state, metrics = fn(state, b, key)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / n_batches
  if count[0] != len(shapes):
    raise AssertionError(f"the step traced {count[0]} times over {len(shapes)} bucket shapes")
  real = sum(int(b["attention_mask"].sum()) for b in host)
  return {"impl": "host", "kind": "bucketed", "host_s": host_s, "step_s": step_s,
          "padding": pad, "buckets": [list(s) for s in shapes], "traces": count[0],
          "real_tokens_per_s": real / n_batches / step_s}


# ------------------------------------------------------------------------------------------------
# PyTorch peer and matmul peak


def time_torch(mode: str, seq: int, batch: int, args) -> dict:
  import torch
  from transformers import BertForSequenceClassification
  cfg = bert_config(args)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  model = BertForSequenceClassification._from_config(cfg, attn_implementation="sdpa").to(device)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01,
                          **({"fused": True} if device == "cuda" else {}))
  fwd = torch.compile(model) if mode == "compile" else model
  bf16 = args.dtype == "bfloat16"
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(2):
    b = random_batch(rng, seq, batch, cfg.vocab_size)
    batches.append({k: torch.from_numpy(b[k]).long().to(device)
                    for k in ("input_ids", "attention_mask", "token_type_ids", "labels")})

  def step(b):
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
      loss = fwd(**b).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  for i in range(args.warmup):
    loss = step(batches[i % 2])
  sync()
  t0 = time.perf_counter()
  for i in range(args.steps):
    loss = step(batches[i % 2])
  sync()
  dt = (time.perf_counter() - t0) / args.steps
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
  return {"impl": f"torch {mode}", "kind": "supervised", "step_s": dt, "peak_bytes": peak,
          "mem_src": "device" if peak else "", "loss": float(loss.detach())}


def matmul_peak(args) -> dict:
  """Best rate of an n x n x n matmul in the compute dtype: 2 n^3 / time."""
  import jax
  import jax.numpy as jnp
  n = args.peak_size
  dtype = jnp.dtype(args.dtype)
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=dtype))
  f(a, b).block_until_ready()
  best, reps = float("inf"), 10
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = f(a, b)
    out.block_until_ready()
    best = min(best, (time.perf_counter() - t0) / reps)
  dev = jax.devices()[0]
  return {"impl": "peak", "flops": 2.0 * n ** 3 / best, "n": n,
          "device": f"{dev.platform}: {getattr(dev, 'device_kind', '')} x{jax.device_count()}"}


def versions() -> dict:
  out = {"python": platform.python_version()}
  for mod in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "numpy"):
    try:
      out[mod] = __import__(mod).__version__
    except ImportError:
      out[mod] = "missing"
  return out


# ------------------------------------------------------------------------------------------------
# Running measurements (in process, or one child process each) and the report


def run_task(task: dict, args, cache: dict) -> dict:
  """One measurement -> a result row; a kind whose code is missing -> status "not available"."""
  what, seq, batch = task["what"], task.get("seq"), task.get("batch")
  try:
    if what == "peak":
      return matmul_peak(args)
    if what == "torch":
      return time_torch(task["mode"], seq, batch, args)
    if what == "host":
      return host_pipeline(seq, batch, args, cache)
    return time_jax_kind(task["kind"], seq, batch, args, cache)
  except (ImportError, KeyError) as e:
    if what != "jax" or (isinstance(e, KeyError) and "not registered" not in str(e)):
      return {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=4)}
    return {"impl": "jaxft", "kind": task["kind"], "status": "not available",
            "reason": f"{type(e).__name__}: {e}"}
  except Exception as e:  # noqa: BLE001 - one failed measurement must not hide the others
    return {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=4)}


def run_isolated(task: dict, args) -> dict:
  payload = json.dumps({"task": task, "args": vars(args)})
  # The child imports this module by name, also from a bare checkout that is not installed.
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
  try:
    proc = subprocess.run([sys.executable, "-m", "jaxft.bench.throughput", "--worker", payload],
                          capture_output=True, text=True, timeout=args.child_timeout, env=env)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {args.child_timeout} s"}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  return {"error": f"child exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}"}


def tasks_for(args) -> list[dict]:
  out = [{"what": "peak"}]
  for seq, batch in parse_shapes(args.shapes):
    for mode in args.torch:
      out.append({"what": "torch", "mode": mode, "seq": seq, "batch": batch})
    for kind in args.kinds:
      out.append({"what": "jax", "kind": kind, "seq": seq, "batch": batch})
    if args.host:
      out.append({"what": "host", "seq": seq, "batch": batch})
  return out


def derive(rows: list[dict], peak: float | None, cfg) -> None:
  """Adds tokens_per_s, mfu (supervised full fine-tuning rows), vs_supervised, vs_compile."""
  by = {(r["seq"], r["batch"], r["impl"], r["kind"]): r for r in rows if "step_s" in r}
  for r in rows:
    if "step_s" not in r or r["impl"] == "host":
      continue
    r["tokens_per_s"] = r["seq"] * r["batch"] / r["step_s"]
    if r["kind"] == "supervised" and peak:
      r["mfu"] = train_flops(cfg, r["seq"], r["batch"]) / r["step_s"] / peak
    sup = by.get((r["seq"], r["batch"], "jaxft", "supervised"))
    if r["impl"] == "jaxft" and sup:
      r["vs_supervised"] = r["step_s"] / sup["step_s"]
    ref = by.get((r["seq"], r["batch"], "torch compile", "supervised"))
    if ref and r["kind"] == "supervised":
      r["vs_compile"] = ref["step_s"] / r["step_s"]


def targets(rows: list[dict]) -> list[tuple[str, str, str, str]]:
  """(target, required, measured, PASS/FAIL/n/a) for every target the run's rows can decide."""
  by = {(r["seq"], r["batch"], r["impl"], r["kind"]): r for r in rows if "step_s" in r}
  out = []

  def add(name, need, value, ok, fmt="{:.2f}x"):
    out.append((name, need, "-" if value is None else fmt.format(value),
                "n/a" if value is None else ("PASS" if ok(value) else "FAIL")))

  for (seq, batch), key in (((128, 64), "speedup_128x64"), ((512, 16), "speedup_512x16")):
    sup = by.get((seq, batch, "jaxft", "supervised"), {})
    add(f"supervised vs torch.compile, seq {seq} x batch {batch}", f">= {TARGETS[key]}x",
        sup.get("vs_compile"), lambda v, t=TARGETS[key]: v >= t)
    if (seq, batch) == (128, 64):
      add("supervised MFU, seq 128 x batch 64", ">= 45%", sup.get("mfu"),
          lambda v: v >= TARGETS["mfu_128x64"], "{:.1%}")
  for (seq, batch) in sorted({(r["seq"], r["batch"]) for r in rows}):
    sup, lora = by.get((seq, batch, "jaxft", "supervised")), by.get((seq, batch, "jaxft", "lora"))
    speed = sup["step_s"] / lora["step_s"] if sup and lora else None
    add(f"LoRA speed vs full FT, {seq}x{batch}", ">= 1.3x", speed, lambda v: v >= 1.3)
    mem = (lora["peak_bytes"] / sup["peak_bytes"] if sup and lora and sup.get("peak_bytes")
           and lora.get("peak_bytes") else None)
    add(f"LoRA peak memory vs full FT, {seq}x{batch}", "<= 0.6x", mem, lambda v: v <= 0.6)
    host = by.get((seq, batch, "host", "bucketed"))
    frac = host["host_s"] / host["step_s"] if host else None
    add(f"host time per batch / step time, {seq}x{batch}", "< 10%", frac, lambda v: v < 0.10,
        "{:.1%}")
  return out


def _mb(x) -> str:
  return "-" if not x else f"{x / 2 ** 20:,.0f} MiB"


def render(meta: dict, rows: list[dict]) -> str:
  lines = ["# jaxft training throughput", "",
           f"- device: {meta['device']}; matmul peak ({meta['dtype']}, n = {meta['peak_n']}): "
           f"{meta['peak_flops'] / 1e12:.3g} TFLOP/s (measured)",
           f"- model: {meta['model']}; compute dtype {meta['dtype']}, attention {meta['attention']}, "
           f"remat {meta['remat']}, donation {meta['donate']}, attention dropout "
           f"{meta['attention_dropout']}; {meta['steps']} timed steps after {meta['warmup']} warmup",
           "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
           f"- date: {meta['date']}; command: `{meta['command']}`"]
  if meta["device"].startswith("cpu"):
    lines += ["", "**CPU run: a smoke test of the script, not comparable to accelerator numbers. "
              "GPU numbers are pending a session with a GPU (benchmarks/README.md has the command).**"]
  lines += ["", "| shape | impl | step kind | step ms | tokens/s | MFU | peak memory | vs supervised "
            "| speedup vs torch.compile |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in rows:
    if r.get("impl") == "host":
      continue
    shape = f"{r['seq']}x{r['batch']}"
    if "step_s" not in r:
      why = r.get("status") or "error"
      lines.append(f"| {shape} | {r.get('impl', '?')} | {r.get('kind', '?')} | {why}: "
                   f"{r.get('reason') or r.get('error', '')} | | | | | |")
      continue
    mem = _mb(r.get("peak_bytes"))
    if r.get("mem_src") == "compiled" and r.get("peak_bytes"):
      mem = "~" + mem
    lines.append(
        f"| {shape} | {r['impl']} | {r['kind']} | {r['step_s'] * 1e3:.2f} | "
        f"{r['tokens_per_s']:,.0f} | {'-' if 'mfu' not in r else format(r['mfu'], '.1%')} | {mem} | "
        f"{'-' if 'vs_supervised' not in r else format(r['vs_supervised'], '.2f') + 'x'} | "
        f"{'-' if 'vs_compile' not in r else format(r['vs_compile'], '.2f') + 'x'} |")
  hosts = [r for r in rows if r.get("impl") == "host"]
  if hosts:
    lines += ["", "Input pipeline (jaxft.data.batching, bucketed; synthetic lognormal lengths):", "",
              "| shape | host ms / batch | bucketed step ms | host / step | padding | buckets "
              "(compiles) | real tokens/s |", "| --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in hosts:
      if "step_s" not in r:
        lines.append(f"| {r['seq']}x{r['batch']} | error: {r.get('error', '')} | | | | | |")
        continue
      lines.append(f"| {r['seq']}x{r['batch']} | {r['host_s'] * 1e3:.2f} | {r['step_s'] * 1e3:.2f} | "
                   f"{r['host_s'] / r['step_s']:.1%} | {r['padding']:.1%} | "
                   f"{', '.join(str(s[1]) for s in r['buckets'])} ({r['traces']}) | "
                   f"{r['real_tokens_per_s']:,.0f} |")
  lines += ["", "Targets:", "", "| target | required | measured | status |",
            "| --- | --- | --- | --- |"]
  cpu = meta["device"].startswith("cpu")  # a smoke run: show the values, judge nothing
  lines += [f"| {a} | {b} | {c} | {'not judged (CPU)' if cpu and d != 'n/a' else d} |"
            for a, b, c, d in targets(rows)]
  return "\n".join(lines) + "\n"


def build_parser(default_out: str = DEFAULT_OUT, prog: str = "jaxft bench") -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
  p.add_argument("--tiny", action="store_true",
                 help="CPU smoke config: hidden 32, 2 layers, 16x8, 3 timed steps, torch eager only")
  p.add_argument("--shapes", default=None, help="SEQxBATCH list (default 128x64,512x16)")
  p.add_argument("--kinds", default=None,
                 help=f"jaxft step kinds or 'all': {', '.join(KINDS)} (default all; tiny: "
                 f"{', '.join(TINY_KINDS)})")
  p.add_argument("--torch", default=None, help="torch peers: eager,compile (or 'none')")
  p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; tiny 3)")
  p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny 1)")
  p.add_argument("--dtype", default=None, help="compute dtype (default bfloat16; tiny float32)")
  p.add_argument("--attention", default="auto", choices=("auto", "cudnn", "xla"))
  p.add_argument("--remat", action="store_true", help="rematerialise each layer (nn.remat)")
  p.add_argument("--no-donate", dest="donate", action="store_false",
                 help="do not donate the state to the step")
  p.add_argument("--attention-dropout", type=float, default=0.0)
  p.add_argument("--buckets", default="", help="bucket boundaries ('' = powers of two)")
  p.add_argument("--no-host", dest="host", action="store_false", help="skip the input pipeline")
  p.add_argument("--peak-size", type=int, default=None, help="matmul n for the peak (8192; tiny 256)")
  p.add_argument("--isolate", default="auto", choices=("auto", "yes", "no"),
                 help="one child process per measurement (auto: yes, except with --tiny)")
  p.add_argument("--child-timeout", type=int, default=900)
  p.add_argument("--out", default=str(default_out), help=f"the report (default {default_out})")
  p.add_argument("--json", default=None, help="rows as JSON (default: beside --out, results.json)")
  p.add_argument("--append", action="store_true",
                 help="merge the rows already in --json (same device) into this run's report")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  return p


def resolve(args) -> argparse.Namespace:
  tiny = args.tiny
  args.shapes = args.shapes or ("16x8" if tiny else "128x64,512x16")
  args.steps = args.steps or (3 if tiny else 20)
  args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
  args.dtype = args.dtype or ("float32" if tiny else "bfloat16")
  args.peak_size = args.peak_size or (256 if tiny else 8192)
  torch_spec = args.torch or ("eager" if tiny else "eager,compile")
  args.torch = [] if torch_spec == "none" else [m for m in torch_spec.split(",") if m]
  bad = set(args.torch) - {"eager", "compile"}
  if bad:
    raise ValueError(f"--torch takes eager, compile or none; got {sorted(bad)}")
  kinds = args.kinds or ("all" if not tiny else ",".join(TINY_KINDS))
  args.kinds = list(KINDS) if kinds == "all" else [k for k in kinds.split(",") if k]
  unknown = set(args.kinds) - set(KINDS)
  if unknown:
    raise ValueError(f"unknown --kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
  args.json = args.json or str(pathlib.Path(args.out).with_name("results.json"))
  return args


def write_report(args, cfg, peak, rows, argv, final: bool, prog: str = "jaxft bench") -> int:
  """Writes --json and --out from the rows so far (called after every measurement, so a run
  killed at a time limit keeps what it measured). Returns 2 on an --append device mismatch."""
  rows = [dict(r) for r in rows]
  meta = {"device": peak["device"], "peak_flops": peak["flops"], "peak_n": peak["n"],
          "dtype": args.dtype, "attention": args.attention, "remat": args.remat,
          "donate": args.donate, "attention_dropout": args.attention_dropout, "steps": args.steps,
          "warmup": args.warmup, "versions": versions(),
          "model": (f"BERT (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
                    f"vocab {cfg.vocab_size})" + (" [tiny]" if args.tiny else " = BERT-base")),
          "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "command": f"{prog} " + " ".join(sys.argv[1:] if argv is None else argv)}
  json_path = pathlib.Path(args.json)
  if args.append and json_path.is_file():
    old = json.loads(json_path.read_text())
    if old["meta"]["device"] != meta["device"]:
      print(f"{prog}: error: --append: {json_path} holds rows from {old['meta']['device']!r}, "
            f"this run is on {meta['device']!r}", file=sys.stderr)
      return 2
    keys = {(r["seq"], r["batch"], r["impl"], r["kind"]) for r in rows}
    rows = [r for r in old["rows"] if (r["seq"], r["batch"], r["impl"], r["kind"]) not in keys] + rows
    rows.sort(key=lambda r: (r["seq"], r["batch"], r["impl"] != "torch eager",
                             r["impl"] != "torch compile", r["impl"] == "host",
                             KINDS.index(r["kind"]) if r["kind"] in KINDS else 99))
    if not old["meta"]["command"].endswith(meta["command"]):  # partial writes of this same run
      meta["command"] = old["meta"]["command"] + " ; " + meta["command"]
    else:
      meta["command"] = old["meta"]["command"]
  derive(rows, meta["peak_flops"], cfg)
  report = render(meta, rows)
  if final:
    print(report)
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(report)
  json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
  return 0


def main(argv=None, default_out: str = DEFAULT_OUT, prog: str = "jaxft bench") -> int:
  """`jaxft bench [flags]` (argv: the flags; None = sys.argv[1:])."""
  args = build_parser(default_out, prog).parse_args(argv)
  if args.worker:
    payload = json.loads(args.worker)
    result = run_task(payload["task"], argparse.Namespace(**payload["args"]), {})
    print("RESULT " + json.dumps(result), flush=True)
    return 0
  try:
    args = resolve(args)
  except ValueError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
  # auto: the full benchmark targets an accelerator -> isolate; --tiny is the in-process CPU smoke.
  # (The parent never touches the device itself, so it holds no memory the children measure.)
  isolate = args.isolate == "yes" or (args.isolate == "auto" and not args.tiny)
  cfg = bert_config(args)
  rows, peak, cache = [], None, {}
  for task in tasks_for(args):
    t0 = time.perf_counter()
    r = run_isolated(task, args) if isolate else run_task(task, args, cache)
    label = " ".join(str(task[k]) for k in ("what", "mode", "kind", "seq", "batch") if k in task)
    status = r.get("error") or r.get("status") or f"{r.get('step_s', 0) * 1e3:.2f} ms/step"
    print(f"[{time.perf_counter() - t0:6.1f}s] {label}: {status}", flush=True)
    if task["what"] == "peak":
      if "error" in r:
        print(f"matmul peak failed: {r['error']}", file=sys.stderr)
        return 1
      peak = r
      continue
    rows.append({**r, "seq": task["seq"], "batch": task["batch"],
                 "impl": r.get("impl") or ("host" if task["what"] == "host" else
                                           f"torch {task.get('mode')}" if task["what"] == "torch"
                                           else "jaxft"),
                 "kind": r.get("kind") or task.get("kind") or "supervised"})
    if write_report(args, cfg, peak, rows, argv, final=False, prog=prog):
      return 2
  if write_report(args, cfg, peak, rows, argv, final=True, prog=prog):
    return 2
  return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
