"""Where the supervised BERT-base step spends its time: full step (threefry / rbg dropout keys),
no dropout, and loss+grad alone (no optimizer), at seq 128 x batch 64 in bf16. One process."""
import sys, time, pathlib, runpy
import numpy as np, jax, jax.numpy as jnp
from types import SimpleNamespace
ns = runpy.run_path(str(pathlib.Path(__file__).resolve().parents[1] / "throughput.py"), run_name="bench")
from transformers import BertConfig
from jaxft.train import mesh as mesh_lib
from jaxft.objectives.base import make_loss_fn
args = SimpleNamespace(tiny=False, attention_dropout=0.0, dtype="bfloat16", attention="auto",
                       remat=False, donate=True)
S, B = 128, int(sys.argv[1]) if len(sys.argv) > 1 else 64
cfg = BertConfig(num_labels=2, attention_probs_dropout_prob=0.0)

def timed(label, f, *xs, n=10):
  t0 = time.perf_counter(); c = jax.jit(f).lower(*xs).compile() if not hasattr(f, "lower") else f.lower(*xs).compile()
  tc = time.perf_counter() - t0
  out = c(*xs); jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(n):
    out = c(*xs)
  jax.block_until_ready(out)
  dt = (time.perf_counter() - t0) / n
  print(f"{label}: {dt*1e3:.2f} ms/step, {S*B/dt:,.0f} tok/s (compile {tc:.0f}s)", flush=True)

def variant(label, impl, hidden_drop=0.1, grad_only=False):
  cfg.hidden_dropout_prob = hidden_drop
  step, state, _ = ns["build_kind"]("supervised", cfg, args, 100, {})
  batch = ns["kind_batch"]("supervised", np.random.default_rng(0), S, B, cfg.vocab_size, False)
  key = jax.random.key(0, impl=impl)
  if grad_only:
    from jaxft.objectives.registry import build
    from jaxft.objectives.base import StepContext
    obj = build(ns["objective_config"]("supervised"), ns["task_info"]())
    loss_fn = make_loss_fn(ns["jax_model"](cfg, args, {}).apply, obj.terms)
    g = jax.value_and_grad(loss_fn, has_aux=True)
    f = lambda tr, fr, b, k: g(tr, fr, b, k, StepContext(step=jnp.int32(0), extras={}))
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    timed(label, f, state.trainable, state.frozen, b, key)
    return
  fn, state, count, mesh = ns["jit_counted"](step, state, args)
  b = mesh_lib.put_batch(batch, mesh)
  c = fn.lower(state, b, key).compile()
  for _ in range(2): state, m = c(state, b, key)
  jax.block_until_ready(m); t0 = time.perf_counter()
  for _ in range(10): state, m = c(state, b, key)
  jax.block_until_ready(m); dt = (time.perf_counter() - t0) / 10
  print(f"{label}: {dt*1e3:.2f} ms/step, {S*B/dt:,.0f} tok/s", flush=True)

print(jax.devices(), flush=True)
variant("full step, threefry dropout", "threefry2x32")
variant("loss+grad only, threefry dropout", "threefry2x32", 0.1, grad_only=True)
variant("full step, no dropout", "threefry2x32", 0.0)
variant("full step, rbg dropout", "rbg")
