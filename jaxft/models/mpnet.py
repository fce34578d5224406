"""MPNet (Song et al. 2020) encoder: BERT-style post-LN layers plus a T5-style relative position bias.

Attention logits are q k^T / sqrt(d) + b[bucket(j - i)] with one learned scalar per (bucket, head),
shared by all layers (`encoder/relative_attention_bias`, HF `encoder.relative_attention_bias`).
Buckets (Raffel et al. 2020): 32 buckets, half per direction; |i - j| < 8 exact, larger distances
log-spaced up to 128. Positions are fairseq-style (padding id 1, real tokens from 2).
HF names: encoder/layer_N/attention/{attn/{q,k,v,o}, LayerNorm}, intermediate/dense,
output/{dense,LayerNorm}.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxft.models import layers as L
from jaxft.models.peft_layers import Adapter

# HF's MPNetEncoder.compute_position_bias always uses 32 buckets / distance 128 (its defaults).
NUM_BUCKETS, MAX_DISTANCE = 32, 128
PADDING_IDX = 1  # MPNetEmbeddings hard-codes padding_idx = 1


def arch_from_hf(hf) -> dict:
  if hf.hidden_size % hf.num_attention_heads:
    raise ValueError(f"hidden_size {hf.hidden_size} is not a multiple of num_attention_heads "
                     f"{hf.num_attention_heads}")
  if hf.relative_attention_num_buckets < NUM_BUCKETS:
    raise ValueError(f"relative_attention_num_buckets={hf.relative_attention_num_buckets}: MPNet "
                     f"indexes {NUM_BUCKETS} buckets, the table needs at least that many rows")
  cls_dropout = getattr(hf, "classifier_dropout", None)
  return dict(
      model_type="mpnet", hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
      num_heads=hf.num_attention_heads, head_dim=hf.hidden_size // hf.num_attention_heads,
      intermediate_size=hf.intermediate_size, hidden_act=hf.hidden_act,
      layer_norm_eps=hf.layer_norm_eps, vocab_size=hf.vocab_size,
      max_position_embeddings=hf.max_position_embeddings, pad_token_id=PADDING_IDX,
      position_ids="padding_offset", hidden_dropout=hf.hidden_dropout_prob,
      attention_dropout=hf.attention_probs_dropout_prob,
      classifier_dropout=hf.hidden_dropout_prob if cls_dropout is None else cls_dropout,
      relative_attention_num_buckets=hf.relative_attention_num_buckets)


def bucket(rel: np.ndarray) -> np.ndarray:
  """int32 buckets of relative positions rel = j - i (any shape), computed in float32 like HF."""
  n = -rel
  half = NUM_BUCKETS // 2
  ret = (n < 0).astype(np.int64) * half
  n = np.abs(n)
  max_exact = half // 2
  with np.errstate(divide="ignore"):
    scaled = (np.log(n.astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(MAX_DISTANCE / max_exact)) * np.float32(half - max_exact))
  large = max_exact + np.trunc(np.where(n < max_exact, 0, scaled)).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (ret + np.where(n < max_exact, n, large)).astype(np.int32)


def relative_position_bucket(q_len: int, k_len: int) -> np.ndarray:
  """int32 [q_len, k_len] bucket of relative position (j - i) of query i and key j."""
  return bucket(np.arange(k_len)[None, :] - np.arange(q_len)[:, None])


def relative_position_bucket_rows(position_ids):
  """int32 [B, S, S] bucket of pos[b, j] - pos[b, i] from per-row position ids [B, S] (packed
  rows: positions restart in every example; pairs across examples are masked anyway).

  A lookup in `bucket` of every distance -(S-1)..S-1 (positions lie in [0, S)), so the buckets
  are the numpy ones to the integer: XLA's float32 log differs from numpy's in the last bit at
  some distances, which near a bucket edge would move the distance to the next bucket."""
  s = position_ids.shape[1]
  table = jnp.asarray(bucket(np.arange(-(s - 1), s)))
  return jnp.take(table, position_ids[:, None, :] - position_ids[:, :, None] + (s - 1))


class MPNetEmbeddings(nn.Module):
  cfg: L.ArchConfig

  @nn.compact
  def __call__(self, input_ids, packing=None):
    cfg = self.cfg
    # float32 lookups and sum, the LayerNorm casts to cfg.dtype (see bert.BertEmbeddings).
    word = L.embed(cfg, cfg.vocab_size, cfg.hidden_size, "word_embeddings").embedding
    pos = L.embed(cfg, cfg.max_position_embeddings, cfg.hidden_size,
                  "position_embeddings").embedding
    # fairseq offsets from cfg.pad_token_id (= PADDING_IDX), restarting in every packed example.
    h = L.rows(word, input_ids) + L.rows(pos, L.positions(cfg, input_ids, packing))
    return L.layer_norm(cfg, "LayerNorm")(h), word


class MPNetAttention(nn.Module):
  """"attention": LN(h + Adapter(Dropout(o(MHA(h, bias))))); children "attn" and "LayerNorm"."""

  cfg: L.ArchConfig

  @nn.compact
  def __call__(self, h, mask, bias, deterministic, output_attentions):
    cfg = self.cfg
    a, probs = L.MultiHeadAttention(cfg, names=("q", "k", "v", "o"), name="attn")(
        h, mask, bias, deterministic, output_attentions)
    a = nn.Dropout(cfg.hidden_dropout)(a, deterministic=deterministic)
    a = Adapter(cfg.peft, where="attn", dtype=cfg.dtype, name="adapter")(a)
    return L.layer_norm(cfg, "LayerNorm")(a + h), probs


class MPNetLayer(nn.Module):
  cfg: L.ArchConfig

  @nn.compact
  def __call__(self, h, mask, bias, deterministic, output_attentions):
    a, probs = MPNetAttention(self.cfg, name="attention")(h, mask, bias, deterministic,
                                                          output_attentions)
    y = L.Intermediate(self.cfg, name="intermediate")(a, deterministic)
    return L.AddNorm(self.cfg, where="ffn", name="output")(y, a, deterministic), probs


class MPNetEncoder(nn.Module):
  """"encoder": the relative position bias (shared by all layers) and the layers.

  The bias is [1, N, S, S] of row offsets j - i for padded rows, and [B, N, S, S] of
  pos[b, j] - pos[b, i] with packing (layers.Packing; mask is then its [B, S, S] block mask)."""

  cfg: L.ArchConfig

  @nn.compact
  def __call__(self, h, mask, packing, deterministic, output_hidden_states, output_attentions):
    cfg = self.cfg
    s = h.shape[1]
    table = L.embed(cfg, cfg.relative_attention_num_buckets, cfg.num_heads,
                    "relative_attention_bias")
    if packing is None:
      buckets = jnp.asarray(relative_position_bucket(s, s))
      bias = jnp.transpose(table(buckets), (2, 0, 1))[None]  # [1, N, S, S]
    else:
      buckets = relative_position_bucket_rows(packing.position_ids)
      bias = jnp.transpose(table(buckets), (0, 3, 1, 2))  # [B, N, S, S]
    return L.run_layers(cfg, MPNetLayer, h, mask, bias, deterministic, output_hidden_states,
                        output_attentions)


class MPNetBackbone(nn.Module):
  """inputs: input_ids int32 [B, S] (pad id 1), attention_mask [B, S]; no token types; packed
  rows add segment_ids, position_ids [B, S] and example_start [E] (layers.Packing)."""

  cfg: L.ArchConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, segment_ids=None,
               position_ids=None, example_start=None, *, deterministic=True,
               embedding_perturbation=None, output_hidden_states=False, output_attentions=False):
    cfg = self.cfg
    packing = L.Packing.from_inputs(segment_ids, position_ids, example_start)
    emb, table = MPNetEmbeddings(cfg, name="embeddings")(input_ids, packing)
    mask = attention_mask.astype(bool)
    encoder = MPNetEncoder(cfg, name="encoder")

    def encode(h, mask, bias, *flags):
      del bias  # the encoder builds its relative position bias itself
      return encoder(h, mask, packing, *flags)

    h, hidden, attns = L.encode_embeddings(
        cfg, emb, mask, deterministic, embedding_perturbation, output_hidden_states,
        output_attentions, encode, packing=packing)
    pooled = L.Pooler(cfg, name="pooler")(h, packing) if cfg.add_pooling_layer else None
    return L.BackboneOutput(h, emb, mask, pooled, hidden, attns, table, packing)
