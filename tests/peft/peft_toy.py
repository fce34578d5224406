"""A toy post-LN encoder built only from jaxft.models.peft_layers hooks, with BERT's parameter
layout (backbone/embeddings, backbone/encoder/layer_i/{attention/{self,output},intermediate,output},
head), so partition / merge / count are tested independently of the model ports."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxft.config import base_config
from jaxft.models.peft_layers import Adapter, Dense, PeftSpec, Prefix, Prompt

VOCAB, HIDDEN, HEADS, FFN, LAYERS, LABELS = 50, 12, 3, 20, 2, 3


class SelfAttention(nn.Module):
  spec: PeftSpec

  @nn.compact
  def __call__(self, x, mask):
    b, s, _ = x.shape
    d = HIDDEN // HEADS
    q, k, v = (Dense(HIDDEN, peft=self.spec, name=n)(x).reshape(b, s, HEADS, d)
               for n in ("query", "key", "value"))
    prefix = Prefix(self.spec, num_heads=HEADS, head_dim=d, name="prefix")()
    if prefix is not None:
      pk, pv = (jnp.broadcast_to(p[None], (b,) + p.shape) for p in prefix)
      k, v = jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1)
      mask = jnp.concatenate([jnp.ones((b, prefix[0].shape[0]), bool), mask], 1)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
    return out.reshape(b, s, HIDDEN)


class AddNorm(nn.Module):
  spec: PeftSpec
  where: str

  @nn.compact
  def __call__(self, x, res):
    y = Dense(HIDDEN, peft=self.spec, name="dense")(x)
    y = Adapter(self.spec, where=self.where, name="adapter")(y)
    return nn.LayerNorm(name="LayerNorm")(y + res)


class Attention(nn.Module):
  spec: PeftSpec

  @nn.compact
  def __call__(self, x, mask):
    return AddNorm(self.spec, "attn", name="output")(SelfAttention(self.spec, name="self")(x, mask), x)


class Intermediate(nn.Module):
  spec: PeftSpec

  @nn.compact
  def __call__(self, x):
    return nn.gelu(Dense(FFN, peft=self.spec, name="dense")(x))


class Layer(nn.Module):
  spec: PeftSpec

  @nn.compact
  def __call__(self, h, mask):
    a = Attention(self.spec, name="attention")(h, mask)
    return AddNorm(self.spec, "ffn", name="output")(Intermediate(self.spec, name="intermediate")(a), a)


class Encoder(nn.Module):
  spec: PeftSpec

  @nn.compact
  def __call__(self, h, mask):
    for i in range(LAYERS):
      h = Layer(self.spec, name=f"layer_{i}")(h, mask)
    return h


class Embeddings(nn.Module):
  @nn.compact
  def __call__(self, ids):
    return nn.LayerNorm(name="LayerNorm")(nn.Embed(VOCAB, HIDDEN, name="word_embeddings")(ids))


class Backbone(nn.Module):
  spec: PeftSpec

  @nn.compact
  def __call__(self, ids, mask):
    h = Embeddings(name="embeddings")(ids)
    prompt = Prompt(self.spec, name="prompt")
    h, mask = prompt(h, mask.astype(bool))
    h = prompt.strip(Encoder(self.spec, name="encoder")(h, mask))
    return jnp.tanh(nn.Dense(HIDDEN, name="pooler")(h[:, 0]))  # BERT's pooler (pooler/kernel)


class ToyModel(nn.Module):
  spec: PeftSpec = PeftSpec()

  @nn.compact
  def __call__(self, ids, mask):
    return nn.Dense(LABELS, name="head")(Backbone(self.spec, name="backbone")(ids, mask))


def toy_batch(seed=0, b=4, s=7):
  k1, k2 = jax.random.split(jax.random.key(seed))
  ids = jax.random.randint(k1, (b, s), 0, VOCAB)
  mask = (jnp.arange(s)[None, :] < jnp.array([s, s - 2, 4, 3])[:b, None]).astype(jnp.int32)
  return {"input_ids": ids, "attention_mask": mask,
          "labels": jax.random.randint(k2, (b,), 0, LABELS)}


def toy_init(spec=PeftSpec(), seed=0):
  """-> (module, params {"backbone", "head"})."""
  model = ToyModel(spec)
  batch = toy_batch()
  return model, model.init(jax.random.key(seed), batch["input_ids"], batch["attention_mask"])["params"]


def toy_logits(model, params, batch):
  return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])


def peft_cfg(method, **kw):
  """base_config().peft with `method` and the given options set."""
  c = base_config().peft
  c.method = method
  for k, v in kw.items():
    c[k] = v
  return c
