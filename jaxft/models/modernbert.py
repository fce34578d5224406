"""ModernBERT (Warner et al. 2024): a pre-LN encoder with rotary positions, alternating global and
sliding-window attention and GeGLU feed-forward blocks, without biases by default.

h_0 = LN(E[x]) (no position embeddings); layer l, with LN_attn the identity in layer 0:
  a = h + Wo Attn(RoPE(Wqkv LN_attn(h))),   h' = a + Wo_mlp(act(u) * g),  [u, g] = Wi LN_mlp(a),
and the encoder output is LN_final(h_L). Layers with layer_types[l] == "full_attention" (every
global_attn_every_n_layers-th, from layer 0) attend to every token with RoPE base global_rope_theta;
the others attend to |i - j| <= local_attention // 2 with base local_rope_theta, the mask HF builds.
Biases of Wqkv / Wo, of the MLP and of the LayerNorms follow attention_bias, mlp_bias, norm_bias.
HF names (base prefix "model"): embeddings/{tok_embeddings, norm}, layers/layer_N/{attn_norm,
attn/{Wqkv, Wo}, mlp_norm, mlp/{Wi, Wo}}, final_norm; `hf.hf_name` maps layers/layer_N to
"layers.N". Task heads: `PredictionHead` ("head": dense -> act -> norm), then "classifier" or the
tied "decoder" (heads.py).

Batches are padded (right padding, as the tokenizers and the batcher produce) or packed
(layers.Packing: several examples per row). HF's unpadded (flash-attention) path computes the same
function on the real tokens; the padded one is used here because it keeps static shapes and runs
on the fused XLA / cuDNN kernels. Packed rows take RoPE at every token's position in its example,
a block-diagonal mask in the global layers and, in the local ones, that mask and
|pos_i - pos_j| <= local_attention // 2 as one [B, S, S] mask.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models import layers as L
from jaxft.models.peft_layers import Adapter, Prefix

GLOBAL, LOCAL = "full_attention", "sliding_attention"


@dataclasses.dataclass(frozen=True)
class ModernBertArch(L.ArchConfig):
  """ArchConfig plus ModernBERT's options (HF names): norm_bias / attention_bias (Wqkv and Wo) /
  mlp_bias (Wi and Wo) / classifier_bias (the prediction head's dense) / decoder_bias (MLM);
  mlp_dropout; layer_types (GLOBAL or LOCAL per layer); global_rope_theta / local_rope_theta;
  local_attention (the sliding window in total: a token sees +-local_attention // 2);
  classifier_act (the prediction head's activation)."""

  norm_bias: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  classifier_bias: bool = False
  decoder_bias: bool = True
  mlp_dropout: float = 0.0
  layer_types: tuple = ()
  global_rope_theta: float = 160_000.0
  local_rope_theta: float = 10_000.0
  local_attention: int = 128
  classifier_act: str = "gelu"


def _layer_types(hf) -> tuple:
  types = getattr(hf, "layer_types", None)
  if types is None:  # configs written before layer_types existed
    every = getattr(hf, "global_attn_every_n_layers", 3)
    types = [LOCAL if i % every else GLOBAL for i in range(hf.num_hidden_layers)]
  types = tuple(types)
  if len(types) != hf.num_hidden_layers or set(types) - {GLOBAL, LOCAL}:
    raise ValueError(f"layer_types={list(types)} must name {GLOBAL!r} or {LOCAL!r} for each of the "
                     f"{hf.num_hidden_layers} layers")
  return types


def _rope_theta(hf, kind: str, legacy: str, default: float) -> float:
  params = (getattr(hf, "rope_parameters", None) or {}).get(kind) or {}
  rope_type = params.get("rope_type", "default")
  if rope_type != "default":
    raise ValueError(f"rope_type={rope_type!r} for {kind} layers is not supported (only 'default')")
  return float(params.get("rope_theta", getattr(hf, legacy, default)))


def arch_from_hf(hf) -> dict:
  """ArchConfig (ModernBertArch) fields from a transformers ModernBertConfig."""
  if hf.hidden_size % hf.num_attention_heads:
    raise ValueError(f"hidden_size {hf.hidden_size} is not a multiple of num_attention_heads "
                     f"{hf.num_attention_heads}")
  return dict(
      model_type="modernbert", hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
      num_heads=hf.num_attention_heads, head_dim=hf.hidden_size // hf.num_attention_heads,
      intermediate_size=hf.intermediate_size, hidden_act=hf.hidden_activation,
      layer_norm_eps=hf.norm_eps, vocab_size=hf.vocab_size,
      max_position_embeddings=hf.max_position_embeddings,
      pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else 0,
      hidden_dropout=float(hf.embedding_dropout), attention_dropout=float(hf.attention_dropout),
      classifier_dropout=float(hf.classifier_dropout), mlp_dropout=float(hf.mlp_dropout),
      norm_bias=bool(hf.norm_bias), attention_bias=bool(hf.attention_bias),
      mlp_bias=bool(hf.mlp_bias), classifier_bias=bool(hf.classifier_bias),
      decoder_bias=bool(hf.decoder_bias), layer_types=_layer_types(hf),
      global_rope_theta=_rope_theta(hf, GLOBAL, "global_rope_theta", 160_000.0),
      local_rope_theta=_rope_theta(hf, LOCAL, "local_rope_theta", 10_000.0),
      local_attention=int(hf.local_attention), classifier_act=hf.classifier_activation)


def norm(cfg: ModernBertArch, name: str) -> nn.LayerNorm:
  """LayerNorm with norm_eps and a bias only when norm_bias (float32 statistics)."""
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_bias=cfg.norm_bias, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, name=name)


def rope_tables(theta: float, head_dim: int, length: int):
  """cos, sin [S, D] float32 of positions 0..S-1 (Su et al. 2021), computed as HF does:
  inv_freq_i = 1 / theta^(2i / D), angle = p * inv_freq, the D/2 angles repeated twice."""
  exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv_freq = np.float32(1.0) / np.power(np.float32(theta), exponent)
  angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]
  angles = np.concatenate([angles, angles], axis=-1)
  return jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))


def apply_rope(x, cos, sin):
  """x [B, S, N, D] rotated in float32: x cos + rotate_half(x) sin; returns x's dtype.
  cos, sin: [S, D] (positions 0..S-1) or [B, S, D] (every token's own position: packed rows)."""
  y = x.astype(jnp.float32)
  half = y.shape[-1] // 2
  rotated = jnp.concatenate([-y[..., half:], y[..., :half]], axis=-1)
  if cos.ndim == 2:
    cos, sin = cos[None], sin[None]
  return (y * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


def window_bias(q_len: int, k_len: int, half: int, dtype):
  """[1, 1, T, K] additive sliding-window bias: 0 where |i - j| <= half, a large negative elsewhere.
  The first K - T key columns (prefix-tuning keys, prepended) are inside every window."""
  offset = k_len - q_len
  i = np.arange(q_len)[:, None]
  j = np.arange(k_len)[None, :] - offset
  inside = (np.abs(i - j) <= half) | (j < 0)
  # -1e30 (finite) as in layers.explicit_attention: a query with no visible key gets a uniform row,
  # as under HF's additive finfo.min mask; float16 takes its own minimum.
  neg = max(-1e30, float(jnp.finfo(dtype).min))
  return jnp.asarray(np.where(inside, 0.0, neg)[None, None], dtype)


def attend(q, k, v, mask, half, impl: str, dropout, deterministic: bool, explicit: bool,
           backend=None):
  """softmax(q k^T / sqrt(d), padding and window masked) v. q [B, T, N, D], k, v [B, K, N, D],
  mask bool [B, K] or [B, T, K] (packed rows, the window already in it); half: None (global, or
  a [B, T, K] mask) or the window's half-width. Returns (out [B, T, N, D], probs [B, N, T, K]
  float32 when explicit else None).

  XLA takes the window as dot_product_attention's local_window_size=(half, half), the same
  |i - j| <= half as HF. cuDNN has no two-sided window without a causal mask, and with prefix keys
  the window is offset, so those get it as an additive bias (window_bias). `backend` overrides
  the implementation handed to JAX (tests run the cuDNN path on XLA)."""
  t, s = q.shape[1], k.shape[1]
  if explicit:
    bias = None if half is None else window_bias(t, s, half, jnp.float32)
    return L.explicit_attention(q, k, v, mask, bias, dropout, deterministic)
  if half is not None and impl == "xla" and t == s:
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :],
                                       local_window_size=(half, half),
                                       implementation=backend or impl)
    return out, None
  bias = None if half is None else window_bias(t, s, half, q.dtype)
  return L.fused_attention(q, k, v, mask, bias, impl, backend), None


class ModernBertEmbeddings(nn.Module):
  """"embeddings": norm(tok_embeddings[x]); float32 lookup, the norm outputs cfg.dtype (see
  bert.BertEmbeddings). Returns ([B, S, H], the table [V, H])."""

  cfg: ModernBertArch

  @nn.compact
  def __call__(self, input_ids):
    cfg = self.cfg
    table = L.embed(cfg, cfg.vocab_size, cfg.hidden_size, "tok_embeddings").embedding
    return norm(cfg, "norm")(L.rows(table, input_ids)), table


class ModernBertAttention(nn.Module):
  """"attn": fused Wqkv -> RoPE on q, k -> (local) attention -> Wo -> dropout -> adapter.

  x [B, S, H], mask bool [B, S] or, packed, [B, S, S] (ModernBertLayers puts a local layer's
  window into it), rope (cos, sin) [S, D] or [B, S, D]. Returns (out [B, S, H], probs or None).
  The Wqkv kernel's columns are [q | k | v], each N heads of D, as HF's view(..., 3, N, D)."""

  cfg: ModernBertArch
  local: bool = False

  @nn.compact
  def __call__(self, x, mask, rope, deterministic, output_attentions):
    cfg = self.cfg
    b, s, _ = x.shape
    n, d = cfg.num_heads, cfg.head_dim
    qkv = L.dense(cfg, 3 * n * d, "Wqkv", cfg.attention_bias)(x, deterministic=deterministic)
    qkv = qkv.reshape(b, s, 3, n, d)
    q, k = (apply_rope(qkv[:, :, i], *rope) for i in (0, 1))
    v = qkv[:, :, 2]
    prefix = Prefix(cfg.peft, num_heads=n, head_dim=d, name="prefix")()
    if prefix is not None:
      # Prefix-tuning keys/values (already in the rotated space) sit in front, always visible.
      pk, pv = (jnp.broadcast_to(p.astype(k.dtype)[None], (b,) + p.shape) for p in prefix)
      k, v = jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1)
      mask = L.prepend_keys(mask, prefix[0].shape[0])
    drop = nn.Dropout(cfg.attention_dropout)
    explicit = output_attentions or (not deterministic and cfg.attention_dropout > 0.0)
    impl = L.resolve_attention_impl(cfg.attention_impl, q.dtype, d)
    # A packed [B, S, S] mask holds the window already: row offsets are not positions there.
    half = cfg.local_attention // 2 if self.local and mask.ndim == 2 else None
    out, probs = attend(q, k, v, mask, half, impl, drop, deterministic, explicit)
    out = L.dense(cfg, cfg.hidden_size, "Wo", cfg.attention_bias)(out.reshape(b, s, n * d),
                                                                  deterministic=deterministic)
    out = nn.Dropout(cfg.attention_dropout)(out, deterministic=deterministic)
    out = Adapter(cfg.peft, where="attn", dtype=cfg.dtype, name="adapter")(out)
    return out, (probs if output_attentions else None)


class ModernBertMLP(nn.Module):
  """"mlp": GeGLU (Shazeer 2020), Wo(Dropout(act(u) * g)) with [u, g] = Wi x, then the adapter."""

  cfg: ModernBertArch

  @nn.compact
  def __call__(self, x, deterministic):
    cfg = self.cfg
    y = L.dense(cfg, 2 * cfg.intermediate_size, "Wi", cfg.mlp_bias)(x, deterministic=deterministic)
    u, g = jnp.split(y, 2, axis=-1)
    y = nn.Dropout(cfg.mlp_dropout)(L.activation(cfg.hidden_act)(u) * g,
                                    deterministic=deterministic)
    y = L.dense(cfg, cfg.hidden_size, "Wo", cfg.mlp_bias)(y, deterministic=deterministic)
    return Adapter(cfg.peft, where="ffn", dtype=cfg.dtype, name="adapter")(y)


class ModernBertLayer(nn.Module):
  """Pre-LN layer `index`: h + attn(attn_norm(h)), then + mlp(mlp_norm(.)); layer 0 has no
  attn_norm (the embedding norm precedes it). rope: this layer type's (cos, sin)."""

  cfg: ModernBertArch
  index: int = 0

  @nn.compact
  def __call__(self, h, mask, rope, deterministic, output_attentions):
    cfg = self.cfg
    x = h if self.index == 0 else norm(cfg, "attn_norm")(h)
    local = cfg.layer_types[self.index] == LOCAL
    a, probs = ModernBertAttention(cfg, local=local, name="attn")(x, mask, rope, deterministic,
                                                                  output_attentions)
    h = h + a
    return h + ModernBertMLP(cfg, name="mlp")(norm(cfg, "mlp_norm")(h), deterministic), probs


class ModernBertLayers(nn.Module):
  """"layers": layer_0..layer_{L-1} with the RoPE tables and mask of their type. mask: bool
  [B, S], or with packing (layers.Packing) its block-diagonal [B, S, S]. Returns (h,
  hidden_states: input of layer 0 and every layer's output, attentions), the last two None unless
  asked for."""

  cfg: ModernBertArch

  @nn.compact
  def __call__(self, h, mask, packing, deterministic, output_hidden_states, output_attentions):
    cfg = self.cfg
    s = h.shape[1]
    ropes = {GLOBAL: rope_tables(cfg.global_rope_theta, cfg.head_dim, s),
             LOCAL: rope_tables(cfg.local_rope_theta, cfg.head_dim, s)}
    masks = {GLOBAL: mask, LOCAL: mask}
    if packing is not None:
      pos = packing.position_ids
      ropes = {t: tuple(jnp.take(x, pos, axis=0) for x in r) for t, r in ropes.items()}
      near = jnp.abs(pos[:, :, None] - pos[:, None, :]) <= cfg.local_attention // 2
      masks[LOCAL] = mask & near
    layer_cls = L.maybe_remat(cfg, ModernBertLayer)
    hidden, attns = [h], []
    for i in range(cfg.num_layers):
      kind = cfg.layer_types[i]
      h, probs = layer_cls(cfg, index=i, name=f"layer_{i}")(h, masks[kind], ropes[kind],
                                                            deterministic, output_attentions)
      hidden.append(h)
      attns.append(probs)
    return (h, tuple(hidden) if output_hidden_states else None,
            tuple(attns) if output_attentions else None)


class ModernBertBackbone(nn.Module):
  """inputs: input_ids int32 [B, S], attention_mask [B, S] (1 = token); token_type_ids is ignored
  (ModernBERT has none); packed rows add segment_ids, position_ids [B, S] and example_start [E]
  (layers.Packing). Returns layers.BackboneOutput; hidden_states end with the final_norm output
  (= last_hidden_state), as HF's."""

  cfg: ModernBertArch

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, segment_ids=None,
               position_ids=None, example_start=None, *, deterministic=True,
               embedding_perturbation=None, output_hidden_states=False, output_attentions=False):
    cfg = self.cfg
    packing = L.Packing.from_inputs(segment_ids, position_ids, example_start)
    emb, table = ModernBertEmbeddings(cfg, name="embeddings")(input_ids)
    mask = attention_mask.astype(bool)
    layers = ModernBertLayers(cfg, name="layers")
    final_norm = norm(cfg, "final_norm")

    def encoder(h, mask, bias, deterministic, output_hidden_states, output_attentions):
      del bias
      h, hidden, attns = layers(h, mask, packing, deterministic, output_hidden_states,
                                output_attentions)
      h = final_norm(h)
      return h, (None if hidden is None else hidden[:-1] + (h,)), attns

    h, hidden, attns = L.encode_embeddings(cfg, emb, mask, deterministic, embedding_perturbation,
                                           output_hidden_states, output_attentions, encoder,
                                           packing=packing)
    return L.BackboneOutput(h, emb, mask, None, hidden, attns, table, packing)


class PredictionHead(nn.Module):
  """HF ModernBertPredictionHead ("head"): norm(act(dense(x))), dense bias only when
  classifier_bias. Shared by the sequence, token and MLM heads."""

  cfg: ModernBertArch

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    x = nn.Dense(cfg.hidden_size, use_bias=cfg.classifier_bias, dtype=cfg.dtype,
                 param_dtype=cfg.param_dtype, kernel_init=nn.initializers.normal(0.02),
                 name="dense")(x)
    return norm(cfg, "norm")(L.activation(cfg.classifier_act)(x))
