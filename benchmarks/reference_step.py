"""A plain hand-written Flax BERT training step: the yardstick `step_cost.py --reference` measures.

Devlin et al. 2019, post-LN: h_0 = LN(E_word[x] + E_pos[p] + E_type[t]); each layer
a = LN(h + Dropout(W_o MHA(h))), h' = LN(a + Dropout(W_2 gelu(W_1 a))); logits = W_c
Dropout(tanh(W_p h'_L[:, 0])). Parameters float32, compute `dtype` (bf16); the embedding sum and its
LayerNorm stay float32 (one [B, S, H] cast after it), the 2-row token-type table is a select, not a
gather. Loss: mean cross-entropy; optimizer optax.chain(clip_by_global_norm(1.0), adamw) with no
decay on biases / LayerNorm (jaxft's mask), warmup 10% then linear decay (jaxft's default schedule).
`lora=True`: base weights frozen (not differentiated, no optimizer state), LoRA r=8, alpha 16 on
query/value (Hu et al. 2021), trainable = LoRA A/B + the classifier. Only jax, flax, optax, numpy.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


@dataclasses.dataclass(frozen=True)
class Cfg:
  vocab: int = 30522
  hidden: int = 768
  layers: int = 12
  heads: int = 12
  inter: int = 3072
  max_pos: int = 512
  dropout: float = 0.1
  labels: int = 2
  lora_rank: int = 0  # > 0: LoRA on query/value
  dtype: jnp.dtype = jnp.bfloat16
  attention: str | None = None  # jax.nn.dot_product_attention implementation; None: cudnn on GPU


init = nn.initializers.normal(0.02)


class Dense(nn.Module):
  """x W + b in cfg.dtype, plus (alpha/r) x A B when LoRA applies to this projection."""
  cfg: Cfg
  features: int
  lora: bool = False

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    y = nn.Dense(self.features, dtype=c.dtype, kernel_init=init, name="base")(x)
    if self.lora and c.lora_rank:
      a = self.param("lora_a", nn.initializers.lecun_uniform(), (x.shape[-1], c.lora_rank))
      b = self.param("lora_b", nn.initializers.zeros, (c.lora_rank, self.features))
      y = y + (16.0 / c.lora_rank) * (x @ a.astype(c.dtype)) @ b.astype(c.dtype)
    return y


class Bert(nn.Module):
  cfg: Cfg

  @nn.compact
  def __call__(self, ids, mask, types, train: bool):
    c, (bsz, s) = self.cfg, ids.shape
    drop = lambda x: nn.Dropout(c.dropout, deterministic=not train)(x)
    ln = lambda name: nn.LayerNorm(1e-12, dtype=c.dtype, name=name)
    word = self.param("word", init, (c.vocab, c.hidden))
    pos = self.param("pos", init, (c.max_pos, c.hidden))
    typ = self.param("type", init, (2, c.hidden))
    h = jnp.take(word, ids, axis=0) + pos[:s] + jnp.where(types[..., None] == 0, typ[0], typ[1])
    h = drop(nn.LayerNorm(1e-12, name="emb_ln")(h).astype(c.dtype))
    n, d = c.heads, c.hidden // c.heads
    impl = c.attention or ("cudnn" if jax.default_backend() == "gpu" else "xla")
    lengths = jnp.sum(mask, -1, dtype=jnp.int32)  # right padding, as tokenizers produce
    for i in range(c.layers):
      proj = lambda name, lora=False: Dense(c, c.hidden, lora, name=f"l{i}_{name}")(h).reshape(
          bsz, s, n, d)
      att = jax.nn.dot_product_attention(proj("q", True), proj("k"), proj("v", True),
                                         key_value_seq_lengths=lengths, implementation=impl)
      a = ln(f"l{i}_ln1")(h + drop(Dense(c, c.hidden, name=f"l{i}_o")(att.reshape(bsz, s, -1))))
      f = jax.nn.gelu(Dense(c, c.inter, name=f"l{i}_ff1")(a), approximate=False)
      h = ln(f"l{i}_ln2")(a + drop(Dense(c, c.hidden, name=f"l{i}_ff2")(f)))
    pooled = jnp.tanh(Dense(c, c.hidden, name="pooler")(h[:, 0]))
    return Dense(c, c.labels, name="classifier")(drop(pooled))


def trains(path: str, cfg: Cfg) -> bool:
  return not cfg.lora_rank or "lora_" in path or path.startswith("classifier/")


def build(cfg: Cfg, seq: int, total_steps: int = 1000, lr: float = 2e-5, seed: int = 0):
  """-> (step, state): state = (step, trainable, frozen, opt_state), flat '/'-keyed dicts;
  step(state, batch, rng) -> (state, {"loss", "grad_norm"}), pure and unjitted."""
  model = Bert(cfg)
  ids = jnp.zeros((1, seq), jnp.int32)
  flat = traverse_util.flatten_dict(model.init(jax.random.key(seed), ids, ids, ids, False)["params"],
                                    sep="/")
  trainable = {k: v for k, v in flat.items() if trains(k, cfg)}
  frozen = {k: v for k, v in flat.items() if not trains(k, cfg)}
  warm = int(0.1 * total_steps)
  sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warm),
                                optax.linear_schedule(lr, 0.0, total_steps - warm)], [warm])
  decay = {k: not (k.endswith("bias") or "ln" in k.split("/")[0]) for k in trainable}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01, mask=decay))

  def loss_fn(tr, fr, batch, rng):
    params = traverse_util.unflatten_dict({**fr, **tr}, sep="/")
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                         batch["token_type_ids"], True, rngs={"dropout": rng})
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           batch["labels"]).mean()

  def step(state, batch, rng):
    n, tr, fr, opt = state
    loss, grads = jax.value_and_grad(loss_fn)(tr, fr, batch, jax.random.fold_in(rng, n))
    updates, opt = tx.update(grads, opt, tr)
    return (n + 1, optax.apply_updates(tr, updates), fr, opt), {
        "loss": loss, "grad_norm": optax.tree.norm(grads)}

  return step, (jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable))
