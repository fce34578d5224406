"""What one compiled train step asks of the machine: jaxft's step against a hand-written Flax step.

    python benchmarks/step_cost.py --seq 128 --batch 4                     # jaxft, supervised
    python benchmarks/step_cost.py --seq 128 --batch 4 --reference         # the yardstick
    python benchmarks/step_cost.py --seq 128 --batch 4 --kind lora [--reference]
    python benchmarks/step_cost.py --seq 128 --batch 4 --variant lean      # step-side variants
    python benchmarks/step_cost.py --tiny                                  # 2 layers x 64 (CI)
    python benchmarks/step_cost.py --rows jaxft:supervised,reference:supervised,\
        jaxft:supervised:default:rbg --jsonl rows.jsonl                   # several, one process
    python benchmarks/step_cost.py --table rows.jsonl                      # markdown, vs reference

No timing: the step is lowered and compiled with `jax.jit(step, donate_argnums=0)` and read.
The last line printed is one JSON object:
  bytes_accessed, flops, transcendentals: `compiled.cost_analysis()` (XLA's count for the whole
    optimized module; on CPU, bytes are what each fused op reads and writes),
  ops: top-level instructions of the optimized ENTRY computation, not counting parameter,
    constant, get-tuple-element, tuple and bitcast (on CPU about one per fusion / matmul / scatter:
    the number of kernels a step launches),
  has_conditional: a `conditional` (lax.cond) anywhere in the optimized module; branch_ops: the
    instructions of each ENTRY conditional's largest branch, which `ops` does not see,
  census: instruction counts anywhere in the module for the opcodes that mark avoidable work
    (scatter, gather, rng ops, conditional, while, sort, all-reduce),
  temp_bytes / argument_bytes: `compiled.memory_analysis()`.

jaxft side (`jaxft_step`): BERT-base from transformers.BertConfig() defaults (12 x 768), random
init through `jaxft.models.init_random`, bf16 compute with float32 params, hidden dropout 0.1,
attention dropout 0, a 2-label sequence head, token_type_ids in the batch, the default train
config (AdamW, clipping 1.0, linear schedule with 10% warmup, nan_policy skip). --kind lora:
peft.method=lora with the default LoRA options; --kind fgm: the fgm objective's defaults. The step
is `jaxft.train.build.build(...).step`, what `jaxft train` jits. --variant changes the step side
(guard, norms) through the config or with local code, to measure what the optimizer side costs;
the model and loss are the same. --reference: `reference_step.py`.

Imports only jax, flax, optax, numpy and transformers (no ml_collections, datasets, seqeval): the
default config is `jaxft.config.base_config()` read through a tiny ConfigDict stand-in when
ml_collections is missing, so this runs on a bare GPU image.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import pathlib
import re
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
if importlib.util.find_spec("jaxft") is None:  # a bare checkout (no pip install -e .)
  sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

KINDS = ("supervised", "lora", "fgm")
VARIANTS = {
    "default": "the step `jaxft train` runs: jaxft.train.build.build()",
    "no_guard": "build() with train.nan_policy=none: no skip of non-finite updates",
    "log_norms": "build() with train.log_norms=True: param_norm and update_norm every step",
    "lean": "local: value_and_grad + optax tx (clip in the chain) + apply_updates, no guard; "
            "metrics: loss terms, one grad norm, lr",
    "lean_cond": "local: lean + the skip as lax.cond (the step before the rewrite)",
    "select_guard": "local: lean + the skip as selects of params and optimizer state around a "
                    "plain optax AdamW (the old moments must outlive their in-place update)",
}
SKIP_OPS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}
CENSUS = ("scatter", "gather", "rng-bit-generator", "rng", "rng-get-and-update-state",
          "conditional", "while", "sort", "all-reduce", "custom-call", "fusion", "dot",
          "convolution")


# ------------------------------------------------------------------------------------------------
# Reading a compiled step

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_BRANCHES = re.compile(r"(?:branch_computations=\{([^}]*)\}|true_computation=%?([\w.\-]+), "
                       r"false_computation=%?([\w.\-]+))")


def _opcode(rhs: str) -> str | None:
  """The opcode of an HLO instruction's right-hand side 'type opcode(operands), attrs'."""
  depth, i = 0, 0
  while i < len(rhs):  # skip the (possibly tuple, possibly /*index*/-commented) result type
    ch = rhs[i]
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == " " and depth == 0:
      break
    i += 1
  m = re.match(r"\s*([a-z][\w\-]*)\(", rhs[i:])
  return m.group(1) if m else None


def hlo_opcodes(text: str) -> dict:
  """Optimized HLO text -> {"entry": opcode counts of the ENTRY computation's top level,
  "all": opcode counts of every computation, "branch_ops": counted top-level instructions of
  the largest branch of each ENTRY conditional (work `ops` does not see)}."""
  per, name, entry_name, branches = {}, None, None, []
  for line in text.splitlines():
    if line.startswith("}"):
      name = None
      continue
    m = _COMPUTATION.match(line)
    if m and "=" not in line.split("(")[0]:
      name = m.group(2)
      per[name] = collections.Counter()
      if m.group(1):
        entry_name = name
      continue
    m = _INSTR.match(line)
    if name is None or not m:
      continue
    op = _opcode(m.group(1))
    if op is None:
      continue
    per[name][op] += 1
    if op == "conditional" and name == entry_name:
      b = _BRANCHES.search(line)
      if b:
        names = b.group(1).split(",") if b.group(1) else [b.group(2), b.group(3)]
        branches.append([n.strip().lstrip("%") for n in names])
  count = lambda c: sum(n for op, n in c.items() if op not in SKIP_OPS)
  everywhere = collections.Counter()
  for c in per.values():
    everywhere.update(c)
  return {"entry": per.get(entry_name, collections.Counter()), "all": everywhere,
          "branch_ops": sum(max(count(per.get(n, {})) for n in bs) for bs in branches)}


def cost_of(step, state, batch, rng) -> dict:
  """Lowers and compiles `step` (state donated) and reads XLA's cost and memory analyses."""
  import jax
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older jax: one dict per module (one here)
    merged = collections.Counter()
    for d in ca:
      merged.update({k: float(v) for k, v in (d or {}).items()})
    ca = dict(merged)
  text = compiled.as_text()
  census = hlo_opcodes(text)
  entry, everywhere = census["entry"], census["all"]
  out = {"bytes_accessed": float(ca.get("bytes accessed", 0.0)), "flops": float(ca.get("flops", 0.0)),
         "transcendentals": float(ca.get("transcendentals", 0.0)),
         "ops": sum(n for op, n in entry.items() if op not in SKIP_OPS),
         "has_conditional": everywhere["conditional"] > 0, "branch_ops": census["branch_ops"],
         "census": {op: everywhere[op] for op in CENSUS if everywhere[op]},
         "entry_top": dict(sorted(((op, n) for op, n in entry.items() if op not in SKIP_OPS),
                                  key=lambda kv: -kv[1])[:8]),
         "compile_s": round(compile_s, 2)}
  try:
    m = compiled.memory_analysis()
    out.update(temp_bytes=int(m.temp_size_in_bytes), argument_bytes=int(m.argument_size_in_bytes))
  except Exception:  # noqa: BLE001 - a backend without memory analysis reports none
    pass
  return out, text


def bert_config(tiny: bool):
  """transformers.BertConfig(): BERT-base defaults (or 2 layers x 64 for --tiny), 2 labels,
  hidden dropout 0.1, attention-probability dropout 0 (the fused attention path)."""
  from transformers import BertConfig
  kw = dict(num_labels=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
  if tiny:
    kw.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
              vocab_size=1024)
  return BertConfig(**kw)


def task_info():
  from jaxft.data.tasks import TaskInfo
  return TaskInfo(name="step_cost", kind="classification", label_names=("neg", "pos"),
                  num_labels=2, metric_names=("accuracy",), main_metric="accuracy")


def random_batch(seq: int, batch: int, vocab: int, seed: int = 0) -> dict:
  """int32 input_ids / attention_mask (all real) / token_type_ids (all 0) [B, S], labels [B],
  float32 example_mask [B]."""
  import numpy as np
  rng = np.random.default_rng(seed)
  return {"input_ids": rng.integers(1, vocab, (batch, seq), dtype=np.int32),
          "attention_mask": np.ones((batch, seq), np.int32),
          "token_type_ids": np.zeros((batch, seq), np.int32),
          "labels": rng.integers(0, 2, (batch,), dtype=np.int32),
          "example_mask": np.ones((batch,), np.float32)}


# ------------------------------------------------------------------------------------------------
# The jaxft step


def jaxft_config(kind: str):
  """base_config() with what this benchmark sets: bf16 compute, dropouts, the kind's objective
  or PEFT method. Everything else (optimizer, schedule, nan_policy, rng_impl) stays default."""
  if kind not in KINDS:
    raise ValueError(f"--kind {kind!r}: use one of {', '.join(KINDS)}")
  from bench_config import base_config
  c = base_config()
  c.model.update(dtype="bfloat16", hidden_dropout=0.1, attention_dropout=0.0)
  c.objective.name = "fgm" if kind == "fgm" else "supervised"
  if kind == "lora":
    c.peft.method = "lora"
  return c


def _make_model(config, hf, info):
  from jaxft import peft
  from jaxft.models import init_random
  m = config.model
  return init_random(hf, head="sequence_classification", num_labels=info.num_labels,
                     dtype=m.dtype, peft=peft.spec_from_config(config.peft), remat=m.remat,
                     hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
                     id2label=dict(enumerate(info.label_names)))


def _parts(config, model, info, total_steps: int):
  """For the local variants: (terms, trainable, frozen, tx with clipping in the chain, schedule),
  the PEFT partition and optimizer as build() makes them."""
  from jaxft import peft
  from jaxft.core.state import flatten
  from jaxft.objectives import registry
  from jaxft.train.optim import make_optimizer
  n_layers = model.config.num_hidden_layers
  flat = flatten(model.params)
  labels = peft.partition(config.peft, flat, n_layers)
  trainable = {k: v for k, v in flat.items() if labels[k] == "trainable"}
  frozen = {k: v for k, v in flat.items() if labels[k] != "trainable"}
  objective = registry.build(config.objective, info)
  tx, schedule = make_optimizer(config.train, trainable, n_layers, total_steps)
  return objective.terms, trainable, frozen, tx, schedule


def _variant_step(variant: str, config, model, info, total_steps: int):
  """-> (step, state) for a local variant (VARIANTS): the same terms, partition, optimizer
  hyper-parameters and dropout keys as build(), different step-side code."""
  import jax
  import jax.numpy as jnp
  import optax
  from jaxft.core.state import TrainState
  from jaxft.objectives.base import StepContext, make_loss_fn
  if variant not in VARIANTS:
    raise ValueError(f"--variant {variant!r}: use one of {', '.join(VARIANTS)}")
  terms, trainable, frozen, tx, schedule = _parts(config, model, info, total_steps)
  grad_fn = jax.value_and_grad(make_loss_fn(model.apply, terms), has_aux=True)

  def step(state, batch, rng):
    ctx = StepContext(step=state.step, extras=state.extras)
    (_, metrics), grads = grad_fn(state.trainable, state.frozen, batch,
                                  jax.random.fold_in(rng, state.step), ctx)
    norm = optax.tree.norm(grads)
    metrics = {**metrics, "grad_norm": norm, "lr": schedule(state.step)}
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    new = state.replace(step=state.step + 1, trainable=optax.apply_updates(state.trainable, updates),
                        opt_state=opt_state)
    if variant == "lean_cond":
      new = jax.lax.cond(ok, lambda: new, lambda: state.replace(step=state.step + 1))
      metrics["nonfinite"] = (~ok).astype(jnp.float32)
    if variant == "select_guard":
      keep = lambda n, o: jnp.where(ok, n, o)
      new = new.replace(trainable=jax.tree_util.tree_map(keep, new.trainable, state.trainable),
                        opt_state=jax.tree_util.tree_map(keep, new.opt_state, state.opt_state))
      metrics["nonfinite"] = (~ok).astype(jnp.float32)
    return new, metrics

  return step, TrainState.create(trainable, frozen, tx)


def jaxft_step(kind: str, seq: int, batch: int, *, tiny: bool = False, variant: str = "default",
               rng_impl: str | None = None, total_steps: int = 1000):
  """-> (step, state, batch, rng): jaxft's pure train step for `kind` as `jaxft train` builds it
  (jaxft.train.build.build), its initial TrainState, a random [batch, seq] batch and the dropout
  key (train.rng_impl, or `rng_impl`). Other variants: VARIANTS."""
  import jax
  import jax.numpy as jnp
  config = jaxft_config(kind)
  if rng_impl:
    config.train.rng_impl = rng_impl
  if variant == "no_guard":
    config.train.nan_policy = "none"
  if variant == "log_norms":
    config.train.log_norms = True
  hf, info = bert_config(tiny), task_info()
  model = _make_model(config, hf, info)
  if variant in ("default", "no_guard", "log_norms"):
    from jaxft.train.build import build
    built = build(config, model, info, total_steps=total_steps)
    step, state = built.step, built.state
  else:
    step, state = _variant_step(variant, config, model, info, total_steps)
  b = {k: jnp.asarray(v) for k, v in random_batch(seq, batch, hf.vocab_size).items()}
  return step, state, b, jax.random.key(config.seed, impl=config.train.rng_impl)


def reference_step(kind: str, seq: int, batch: int, *, tiny: bool = False,
                   rng_impl: str | None = None):
  """-> (step, state, batch, rng) of reference_step.py for the same model and batch."""
  import jax
  import jax.numpy as jnp
  import reference_step as ref
  if kind not in ("supervised", "lora"):
    raise ValueError(f"--reference has kinds supervised and lora, not {kind!r}")
  hf = bert_config(tiny)
  cfg = ref.Cfg(vocab=hf.vocab_size, hidden=hf.hidden_size, layers=hf.num_hidden_layers,
                heads=hf.num_attention_heads, inter=hf.intermediate_size,
                max_pos=hf.max_position_embeddings, lora_rank=8 if kind == "lora" else 0)
  step, state = ref.build(cfg, seq)
  b = {k: jnp.asarray(v) for k, v in random_batch(seq, batch, hf.vocab_size).items()}
  return step, state, b, jax.random.key(0, impl=rng_impl or "threefry2x32")


def measure(kind="supervised", seq=128, batch=4, *, reference=False, tiny=False,
            variant="default", rng_impl=None, hlo_path=None) -> dict:
  """One row: cost_of(...) plus what was measured."""
  import jax
  if reference:
    step, state, b, rng = reference_step(kind, seq, batch, tiny=tiny, rng_impl=rng_impl)
  else:
    step, state, b, rng = jaxft_step(kind, seq, batch, tiny=tiny, variant=variant,
                                     rng_impl=rng_impl)
  row, text = cost_of(step, state, b, rng)
  if hlo_path:
    pathlib.Path(hlo_path).write_text(text)
  return {"impl": "reference" if reference else "jaxft", "kind": kind, "seq": seq, "batch": batch,
          "tiny": tiny, "variant": "default" if reference else variant,
          "rng_impl": str(jax.random.key_impl(rng)), **row,
          "backend": jax.default_backend(), "jax": jax.__version__}


def parse_rows(spec: str) -> list[dict]:
  """'jaxft:supervised,reference:lora,jaxft:supervised:lean,jaxft:supervised:default:rbg' ->
  measure() keyword dicts (impl:kind[:variant[:rng_impl]])."""
  rows = []
  for item in filter(None, (x.strip() for x in spec.split(","))):
    parts = item.split(":")
    if parts[0] not in ("jaxft", "reference") or not 2 <= len(parts) <= 4 or parts[1] not in KINDS:
      raise ValueError(f"--rows item {item!r}: use jaxft|reference:KIND[:VARIANT[:RNG_IMPL]], "
                       f"KIND in {', '.join(KINDS)}")
    rows.append({"reference": parts[0] == "reference", "kind": parts[1],
                 "variant": parts[2] if len(parts) > 2 else "default",
                 "rng_impl": parts[3] if len(parts) > 3 else None})
  return rows


def describe(row: dict) -> str:
  name = f"{row['impl']} {row['kind']}" + ("" if row["variant"] == "default" else
                                          f" [{row['variant']}]")
  return (f"{name}, seq {row['seq']} x batch {row['batch']}{' (tiny)' if row['tiny'] else ''}, "
          f"{row['rng_impl']} keys, {row['backend']}: {row['flops'] / 1e9:.2f} GFLOP, "
          f"{row['bytes_accessed'] / 1e9:.3f} GB accessed, {row['ops']} ops, conditional: "
          f"{'yes' if row['has_conditional'] else 'no'}, census {row['census']} "
          f"(compiled in {row['compile_s']:.1f} s)")


def table(rows: list[dict]) -> str:
  """Markdown table of rows; ratios against the reference row of the same kind, shape and keys."""
  ref = {(r["kind"], r["seq"], r["batch"], r["rng_impl"]): r for r in rows
         if r["impl"] == "reference"}
  lines = ["| step | seq x batch | keys | GB accessed | GFLOP | ops | conditional | "
           "vs reference (bytes / flops / ops) |", "| --- | --- | --- | ---: | ---: | ---: | --- | --- |"]
  for r in rows:
    name = f"{r['impl']} {r['kind']}" + ("" if r["variant"] == "default" else f" [{r['variant']}]")
    base = ref.get((r["kind"], r["seq"], r["batch"], r["rng_impl"]))
    vs = "" if base is None or base is r else " / ".join(
        f"{r[k] / base[k]:.3f}x" for k in ("bytes_accessed", "flops", "ops"))
    lines.append(f"| {name} | {r['seq']} x {r['batch']} | {r['rng_impl']} | "
                 f"{r['bytes_accessed'] / 1e9:.3f} | {r['flops'] / 1e9:.2f} | {r['ops']} | "
                 f"{'yes' if r['has_conditional'] else 'no'} | {vs} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--kind", default="supervised", choices=KINDS)
  p.add_argument("--reference", action="store_true", help="the hand-written Flax step")
  p.add_argument("--tiny", action="store_true", help="2 layers, hidden 64 (CI)")
  p.add_argument("--variant", default="default", choices=list(VARIANTS),
                 help="; ".join(f"{k}: {v}" for k, v in VARIANTS.items()))
  p.add_argument("--rng-impl", default=None, choices=("threefry2x32", "rbg", "unsafe_rbg"),
                 help="dropout key implementation (default: train.rng_impl)")
  p.add_argument("--hlo", default=None, help="also write the optimized HLO text here")
  p.add_argument("--rows", default=None,
                 help="several measurements in one process: impl:kind[:variant[:rng_impl]], e.g. "
                      "jaxft:supervised,reference:supervised,jaxft:supervised:default:rbg")
  p.add_argument("--jsonl", default=None, help="append each row's JSON to this file as it is done")
  p.add_argument("--table", default=None, help="print a markdown table of this .jsonl and exit")
  a = p.parse_args(argv)
  if a.table:
    print(table([json.loads(x) for x in pathlib.Path(a.table).read_text().splitlines() if x]))
    return None
  specs = parse_rows(a.rows) if a.rows else [
      {"reference": a.reference, "kind": a.kind, "variant": a.variant, "rng_impl": a.rng_impl}]
  out = []
  for spec in specs:
    row = measure(spec["kind"], a.seq, a.batch, reference=spec["reference"], tiny=a.tiny,
                  variant=spec["variant"], rng_impl=spec["rng_impl"] or a.rng_impl,
                  hlo_path=a.hlo if len(specs) == 1 else None)
    print(describe(row), flush=True)
    print(json.dumps(row), flush=True)
    if a.jsonl:
      with open(a.jsonl, "a") as f:
        f.write(json.dumps(row) + "\n")
    out.append(row)
  return out[-1] if len(out) == 1 else out


if __name__ == "__main__":
  main()
