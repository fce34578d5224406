"""Blocks every encoder family shares: the architecture config, activations, and multi-head attention.

Attention goes through `jax.nn.dot_product_attention`, so on GPU with bf16/fp16 the cuDNN flash
kernel runs. The probabilities are materialised only when they are asked for (output_attentions) or
when attention-probability dropout is active (the fused kernels have no dropout), which is what the
Hugging Face reference does in training; pass `attention_dropout=0.0` to train on the fused path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxft.models.peft_layers import Adapter, Dense, PeftSpec, Prefix, Prompt

ATTENTION_IMPLS = (None, "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class ArchConfig:
  """Static description of one encoder (hashable: it is a field of the Flax modules).

  Built from a Hugging Face config by the family's `arch_from_hf`; sizes are HF's. `position_ids`:
  "absolute" (0..S-1, BERT/ELECTRA/DistilBERT) or "padding_offset" (fairseq: cumsum of non-pad
  tokens + pad_token_id, RoBERTa/MPNet). Runtime options: `dtype` is the compute dtype, `param_dtype`
  the master-parameter dtype, `attention_impl` None (auto) / "xla" / "cudnn", `remat` wraps each layer
  in nn.remat with `remat_policy` (a name in jax.checkpoint_policies, None = save nothing).
  """

  model_type: str
  hidden_size: int
  num_layers: int
  num_heads: int
  head_dim: int
  intermediate_size: int
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  vocab_size: int = 0
  max_position_embeddings: int = 512
  type_vocab_size: int = 0
  pad_token_id: int = 0
  embedding_size: int = 0  # ELECTRA: factorised embeddings, projected to hidden_size
  position_ids: str = "absolute"
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  classifier_dropout: float = 0.1
  relative_attention_num_buckets: int = 0  # MPNet
  image_size: int = 0  # ViT
  patch_size: int = 0
  num_channels: int = 3
  qkv_bias: bool = True
  pooler_size: int = 0
  pooler_act: str = "tanh"
  add_pooling_layer: bool = False
  mlm_act: str = "gelu"
  # Runtime options.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  remat: bool = False
  remat_policy: Optional[str] = None
  peft: PeftSpec = PeftSpec()


def _gelu_exact(x):
  return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)


# Names as in transformers.activations.ACT2FN.
ACTIVATIONS = {
    "gelu": _gelu_exact,
    "gelu_python": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "linear": lambda x: x,
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}")
  return ACTIVATIONS[name]


def layer_norm(cfg: ArchConfig, name: str, eps: float | None = None) -> nn.LayerNorm:
  """LayerNorm with HF's epsilon; statistics are computed in float32 even in bf16 compute."""
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps if eps is None else eps, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, name=name)


def dense(cfg: ArchConfig, features: int, name: str, use_bias: bool = True) -> Dense:
  """A PEFT-aware projection (LoRA / DoRA / IA3 hook) with HF's normal(0.02) init."""
  return Dense(features, peft=cfg.peft, use_bias=use_bias, dtype=cfg.dtype,
               param_dtype=cfg.param_dtype, name=name)


def resolve_attention_impl(impl: Optional[str], dtype, head_dim: int) -> str:
  """None -> "cudnn" on GPU for bf16/fp16 with a head size cuDNN takes (multiple of 8, <= 128),
  else "xla". An explicit choice is returned as is (cuDNN raises itself if it cannot run)."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
  if impl is not None:
    return impl
  on_gpu = jax.default_backend() == "gpu"
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if on_gpu and half and head_dim % 8 == 0 and head_dim <= 128 else "xla"


def fused_attention(q, k, v, mask, bias, impl: str, backend: Optional[str] = None):
  """softmax(q k^T / sqrt(d) + bias, masked) v through jax.nn.dot_product_attention.

  q: [B, T, N, D]; k, v: [B, S, N, D]; mask: bool [B, S] (True = attend; padding) or [B, T, S]
  (packed rows: `segment_mask`) or None; bias: [1|B, N, T, S] or None. For "cudnn" a [B, S] mask
  goes in as `key_value_seq_lengths` = number of True entries (cuDNN rejects a [B, 1, 1, S] mask),
  which is exact for right-padded masks (what HF tokenizers and our batcher produce); lengths are
  clamped to >= 1 so all-padding rows stay finite. A packed [B, T, S] mask goes to cuDNN as an
  additive bias (0 / -1e9), the form its fused kernel takes.
  `backend` overrides the implementation passed to JAX (tests run the cudnn mask path on "xla").
  Returns [B, T, N, D].
  """
  run = backend or impl
  if impl == "cudnn" and mask is not None and mask.ndim == 3:
    block = jnp.where(mask[:, None], 0.0, -1e9).astype(q.dtype)
    bias = block if bias is None else bias.astype(q.dtype) + block
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=run)
  if impl == "cudnn" and mask is not None:
    lengths = jnp.maximum(jnp.sum(mask.astype(jnp.int32), axis=-1), 1).astype(jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, key_value_seq_lengths=lengths,
                                        implementation=run)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=broadcast_mask(mask),
                                      implementation=run)


def broadcast_mask(mask):
  """bool [B, S] (keys) -> [B, 1, 1, S]; [B, T, S] (packed) -> [B, 1, T, S]; None stays None."""
  if mask is None:
    return None
  return mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]


def segment_mask(segment_ids):
  """Block-diagonal attention of packed rows: bool [B, S, S], query i sees key j iff both tokens
  belong to the same example (segment_ids[i] == segment_ids[j] > 0). A padding query (id 0) sees
  nothing; its row is computed like a fully masked one and never read."""
  return (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)


def prepend_keys(mask, n: int):
  """The mask with n always-visible keys in front (prefix-tuning): [B, S] -> [B, n + S],
  [B, T, S] -> [B, T, n + S]. Every segment of a packed row sees the prefix."""
  ones = jnp.ones(mask.shape[:-1] + (n,), bool)
  return jnp.concatenate([ones, mask.astype(bool)], -1)


def explicit_attention(q, k, v, mask, bias, dropout: nn.Module, deterministic: bool):
  """The same attention with the probabilities materialised: [B, N, T, S] float32 softmax, then
  dropout on them (as HF does). Masked logits are set to a large negative, so a fully masked row
  becomes uniform, like HF's additive finfo.min mask. Returns (out [B, T, N, D], probs)."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(broadcast_mask(mask), logits, jnp.float32(-1e30))
  probs = jax.nn.softmax(logits, axis=-1)
  dropped = dropout(probs, deterministic=deterministic)
  out = jnp.einsum("bnts,bsnd->btnd", dropped.astype(v.dtype), v)
  return out, probs


class MultiHeadAttention(nn.Module):
  """Query/key/value projections, optional prefix-tuning key/values, attention, optional output
  projection. Submodule names come from `names` = (query, key, value[, output]) so the parameter
  tree matches the HF checkpoint of each family ("query"/"key"/"value", "q_lin"/..., "q"/...).

  x: [B, S, H]; mask: bool [B, S] or, packed, [B, S, S]; bias: [1|B, N, S, S] additive (MPNet's
  relative positions).
  Returns (out [B, S, H'], probs [B, N, S, S + prefix] or None).
  """

  cfg: ArchConfig
  names: tuple = ("query", "key", "value")
  use_bias: bool = True

  @nn.compact
  def __call__(self, x, mask, bias=None, deterministic: bool = True, output_attentions: bool = False):
    cfg = self.cfg
    b, s, _ = x.shape
    n, d = cfg.num_heads, cfg.head_dim

    def proj(name):
      y = dense(cfg, n * d, name, self.use_bias)(x, deterministic=deterministic)
      return y.reshape(b, s, n, d)

    q, k, v = (proj(name) for name in self.names[:3])
    prefix = Prefix(cfg.peft, num_heads=n, head_dim=d, name="prefix")()
    if prefix is not None:
      # Prefix-tuning (Li & Liang 2021): P learned keys/values in front, always attended to.
      pk, pv = (jnp.broadcast_to(p.astype(k.dtype)[None], (b,) + p.shape) for p in prefix)
      k, v = jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1)
      p_len = prefix[0].shape[0]
      if mask is not None:
        mask = prepend_keys(mask, p_len)
      if bias is not None:
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (p_len, 0)))
    if bias is not None:
      bias = bias.astype(q.dtype)
    drop = nn.Dropout(cfg.attention_dropout)
    if output_attentions or (not deterministic and cfg.attention_dropout > 0.0):
      out, probs = explicit_attention(q, k, v, mask, bias, drop, deterministic)
    else:
      impl = resolve_attention_impl(cfg.attention_impl, q.dtype, d)
      out, probs = fused_attention(q, k, v, mask, bias, impl), None
    out = out.reshape(b, s, n * d)
    if len(self.names) > 3:
      out = dense(cfg, cfg.hidden_size, self.names[3])(out, deterministic=deterministic)
    return out, (probs if output_attentions else None)


def maybe_remat(cfg: ArchConfig, layer_cls):
  """nn.remat(layer_cls) when cfg.remat; the layer's __call__ must be
  (self, h, mask, bias, deterministic, output_attentions) with the last two static."""
  if not cfg.remat:
    return layer_cls
  policy = None
  if cfg.remat_policy is not None:
    if not hasattr(jax.checkpoint_policies, cfg.remat_policy):
      raise ValueError(f"unknown remat_policy {cfg.remat_policy!r}; use a name from "
                       "jax.checkpoint_policies, e.g. 'nothing_saveable' or 'dots_saveable'")
    policy = getattr(jax.checkpoint_policies, cfg.remat_policy)
  return nn.remat(layer_cls, static_argnums=(4, 5), policy=policy)


def masked_mean(h, mask):
  """Mean over real tokens: sum_s m_s h_s / max(sum_s m_s, 1). h [B, S, H], mask [B, S] -> [B, H]."""
  m = mask.astype(jnp.float32)[..., None]
  return (jnp.sum(h.astype(jnp.float32) * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)).astype(h.dtype)


@flax.struct.dataclass
class Packing:
  """Where the examples of packed rows are (jaxft.data.packing builds them; None = padded rows).

  segment_ids int32 [B, S]: 0 at padding, e + 1 at the tokens of example slot e (slots are unique
    over the whole batch, so no two rows share an id). position_ids int32 [B, S]: 0..n_e - 1 inside
    every example, 0 at padding. example_start int32 [E]: the flat index r * S + offset of slot e's
    first token (0 for unused slots, whose outputs are masked by example_mask downstream).
  """

  segment_ids: jax.Array
  position_ids: jax.Array
  example_start: jax.Array

  @classmethod
  def from_inputs(cls, segment_ids=None, position_ids=None, example_start=None):
    """A Packing when segment_ids is given (then all three must be), else None."""
    if segment_ids is None:
      return None
    if position_ids is None or example_start is None:
      raise ValueError("a packed batch needs segment_ids, position_ids and example_start together")
    return cls(jnp.asarray(segment_ids, jnp.int32), jnp.asarray(position_ids, jnp.int32),
               jnp.asarray(example_start, jnp.int32))

  @property
  def num_examples(self) -> int:
    return self.example_start.shape[0]

  def attention_mask(self):
    return segment_mask(self.segment_ids)

  def first_tokens(self, h):
    """h [B, S, H] -> [E, H]: every example's first token (its CLS / <s>)."""
    return jnp.take(h.reshape((-1,) + h.shape[2:]), self.example_start, axis=0)

  def mean(self, h):
    """Mean over each example's tokens: [B, S, H] -> [E, H], accumulated in float32."""
    flat = h.reshape((-1, h.shape[-1])).astype(jnp.float32)
    ids = self.segment_ids.reshape(-1) - 1  # padding -> -1, dropped by segment_sum
    total = jax.ops.segment_sum(flat, ids, num_segments=self.num_examples)
    count = jax.ops.segment_sum(jnp.ones_like(ids, jnp.float32), ids,
                                num_segments=self.num_examples)
    return (total / jnp.maximum(count, 1.0)[:, None]).astype(h.dtype)


def first_tokens(h, packing: Optional[Packing]):
  """[B, S, H] -> the first token of every example: h[:, 0] ([B, H]), or [E, H] when packed."""
  return h[:, 0] if packing is None else packing.first_tokens(h)


def positions(cfg: ArchConfig, input_ids, packing: Optional[Packing]):
  """Position ids [B, S] (or [1, S]) by cfg.position_ids, restarting in every packed example:
  "absolute" 0..n-1; "padding_offset" (fairseq) pad + 1 + (0..n-1) at tokens, pad at padding."""
  if packing is None:
    if cfg.position_ids == "padding_offset":
      return padding_offset_positions(input_ids, cfg.pad_token_id)
    return jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None]
  if cfg.position_ids == "padding_offset":
    return jnp.where(packing.segment_ids > 0, packing.position_ids + cfg.pad_token_id + 1,
                     cfg.pad_token_id)
  return packing.position_ids


@dataclasses.dataclass
class BackboneOutput:
  """What a family's encoder returns to the task model (internal; see outputs.ModelOutput).

  last_hidden_state [B, S, H] (prompt positions stripped), embeddings [B, S, E] (the tensor the
  perturbation is added to), mask bool [B, S], pooled [B, H'] or None ([E, H'] when packed),
  hidden_states / attentions tuples or None, word_embeddings [V, E] (for tied MLM decoders) or
  None, packing: the batch's Packing or None.
  """

  last_hidden_state: Any
  embeddings: Any
  mask: Any
  pooled: Any = None
  hidden_states: Any = None
  attentions: Any = None
  word_embeddings: Any = None
  packing: Any = None


class AddNorm(nn.Module):
  """Post-LN sublayer output (BERT's SelfOutput / Output): LN(x_res + Adapter(Dropout(W x + b))).

  Named "output" in HF, with children "dense" and "LayerNorm"; the adapter (Houlsby et al. 2019)
  sits after the projection and before the residual, as `where` ("attn" or "ffn").
  """

  cfg: ArchConfig
  where: str = "ffn"

  @nn.compact
  def __call__(self, x, residual, deterministic: bool = True):
    cfg = self.cfg
    y = dense(cfg, cfg.hidden_size, "dense")(x, deterministic=deterministic)
    y = nn.Dropout(cfg.hidden_dropout)(y, deterministic=deterministic)
    y = Adapter(cfg.peft, where=self.where, dtype=cfg.dtype, name="adapter")(y)
    return layer_norm(cfg, "LayerNorm")(y + residual)


class Intermediate(nn.Module):
  """act(W x + b) into the intermediate size (HF "intermediate" with child "dense")."""

  cfg: ArchConfig

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    y = dense(self.cfg, self.cfg.intermediate_size, "dense")(x, deterministic=deterministic)
    return activation(self.cfg.hidden_act)(y)


def run_layers(cfg: ArchConfig, layer_cls, h, mask, bias, deterministic: bool,
               output_hidden_states: bool, output_attentions: bool):
  """Applies cfg.num_layers layers named layer_0..layer_{L-1} in the calling module's scope.

  Returns (h, hidden_states, attentions): hidden_states is (input of layer 0, ..., output of layer
  L-1), L + 1 arrays, as HF; attentions L arrays [B, N, S, S]; None when not asked for.
  """
  cls = maybe_remat(cfg, layer_cls)
  hidden, attns = [h], []
  for i in range(cfg.num_layers):
    h, probs = cls(cfg, name=f"layer_{i}")(h, mask, bias, deterministic, output_attentions)
    hidden.append(h)
    attns.append(probs)
  return (h, tuple(hidden) if output_hidden_states else None,
          tuple(attns) if output_attentions else None)


def encode_embeddings(cfg: ArchConfig, emb, mask, deterministic: bool, embedding_perturbation,
                      output_hidden_states: bool, output_attentions: bool, encoder: nn.Module,
                      project: Optional[nn.Module] = None, bias=None,
                      packing: Optional[Packing] = None):
  """The part every family shares after its embedding block (call inside the backbone's compact).

  emb [B, S, E] (embedding output before dropout) + embedding_perturbation -> dropout ->
  optional projection (ELECTRA) -> soft prompt (PEFT, inserted after token 0) -> encoder ->
  prompt positions stripped from the last and all hidden states (attention maps keep them).
  With `packing` the encoder gets the block-diagonal [B, S, S] mask instead of mask [B, S].
  Returns (last_hidden_state, hidden_states, attentions).
  """
  if embedding_perturbation is not None:
    emb = emb + embedding_perturbation.astype(emb.dtype)
  h = nn.Dropout(cfg.hidden_dropout)(emb, deterministic=deterministic)
  if project is not None:
    h = project(h, deterministic=deterministic)
  prompt = Prompt(cfg.peft, name="prompt")
  if packing is not None:
    if cfg.peft.prompt_length > 0:
      raise ValueError("prompt tuning inserts its vectors after a row's first token, which in a "
                       "packed row belongs to one example only. Fix: --config.data.packing=false")
    mask = packing.attention_mask()
  h, mask = prompt(h, mask)
  h, hidden, attns = encoder(h, mask, bias, deterministic, output_hidden_states, output_attentions)
  if hidden is not None:
    hidden = tuple(prompt.strip(x) for x in hidden)
  return prompt.strip(h), hidden, attns


class Pooler(nn.Module):
  """HF pooler: act(W h_0 + b) (tanh for BERT-likes) of every example's first token h_0 (h[:, 0],
  or each packed example's: [E, H]). "pooler" with child "dense"."""

  cfg: ArchConfig

  @nn.compact
  def __call__(self, h, packing: Optional[Packing] = None):
    size = self.cfg.pooler_size or self.cfg.hidden_size
    y = nn.Dense(size, dtype=self.cfg.dtype, param_dtype=self.cfg.param_dtype,
                 kernel_init=nn.initializers.normal(0.02), name="dense")(first_tokens(h, packing))
    return activation(self.cfg.pooler_act)(y)


def embed(cfg: ArchConfig, num: int, features: int, name: str) -> nn.Embed:
  """An embedding table [num, features] (param "embedding", HF's normal(0.02)). The families read
  `.embedding` and look rows up with `rows` / `leading_rows` rather than calling the module:
  nn.Embed would gather in the compute dtype, so its backward is a bf16 scatter-add."""
  return nn.Embed(num, features, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  embedding_init=nn.initializers.normal(0.02), name=name)


SMALL_TABLE = 8  # tables of at most this many rows are looked up by selects, not a gather


def rows(table, ids):
  """table[ids]: [..., E] in the table's (parameter) dtype, for int ids [...].

  A gather (jnp.take, out-of-range ids give NaN rows) whose backward is a float32 scatter-add
  into the table. A table of <= SMALL_TABLE rows (token types: 2 for BERT, 1 for RoBERTa) is a
  chain of selects instead, which fuses with the embedding sum; its backward is one masked
  reduction per row, not a scatter where every position hits the same few rows. There ids outside
  [0, rows) read row 0.
  """
  n = table.shape[0]
  if n > SMALL_TABLE:
    return jnp.take(table, ids, axis=0)
  out = jnp.broadcast_to(table[0], ids.shape + table.shape[1:])
  for r in range(1, n):
    out = jnp.where((ids == r)[..., None], table[r], out)
  return out


def leading_rows(table, length: int):
  """table[0:length] as [1, length, E]: absolute positions 0..S-1 are a slice, not a gather (the
  backward pads the gradient into the table). Fails for length > rows, where a gather would
  have read out of range."""
  if length > table.shape[0]:
    raise ValueError(f"sequence length {length} exceeds the {table.shape[0]} position "
                     "embeddings of this model")
  return table[None, :length]


def padding_offset_positions(input_ids, pad_token_id: int):
  """fairseq/RoBERTa positions: pad + cumsum(non-pad) on real tokens, pad on padding tokens."""
  not_pad = (input_ids != pad_token_id).astype(jnp.int32)
  return jnp.cumsum(not_pad, axis=1) * not_pad + pad_token_id


class Encoder(nn.Module):
  """A stack of `layer` modules named layer_0..layer_{L-1} (HF "encoder.layer.N")."""

  cfg: ArchConfig
  layer: Any

  @nn.compact
  def __call__(self, h, mask, bias, deterministic, output_hidden_states, output_attentions):
    return run_layers(self.cfg, self.layer, h, mask, bias, deterministic, output_hidden_states,
                      output_attentions)
