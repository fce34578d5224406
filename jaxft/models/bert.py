"""BERT, RoBERTa and ELECTRA (discriminator) encoders: one post-LN transformer, three embeddings.

Devlin et al. 2019 (BERT): h_0 = LN(E_word[x] + E_pos[p] + E_type[t]); every layer is
a = LN(h + Dropout(W_o MHA(h))), h' = LN(a + Dropout(W_2 act(W_1 a))). RoBERTa (Liu et al. 2019)
differs only in fairseq position ids (cumsum of non-pad tokens + pad id). ELECTRA (Clark et al.
2020) factorises the embeddings to size E and projects them to H with `embeddings_project`.
Parameter names follow the HF checkpoints: embeddings/{word,position,token_type}_embeddings,
encoder/layer_N/attention/{self/{query,key,value}, output/{dense,LayerNorm}},
encoder/layer_N/{intermediate/dense, output/{dense,LayerNorm}}, pooler/dense.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxft.models import layers as L


def arch_from_hf(hf) -> dict:
  """ArchConfig fields from a transformers BertConfig / RobertaConfig / ElectraConfig."""
  pet = getattr(hf, "position_embedding_type", "absolute") or "absolute"
  if pet != "absolute":
    raise ValueError(f"position_embedding_type={pet!r} is not supported (only 'absolute'); "
                     "the relative_key variants are not ported")
  if hf.hidden_size % hf.num_attention_heads:
    raise ValueError(f"hidden_size {hf.hidden_size} is not a multiple of num_attention_heads "
                     f"{hf.num_attention_heads}")
  hidden_dropout = hf.hidden_dropout_prob
  cls_dropout = getattr(hf, "classifier_dropout", None)
  return dict(
      model_type=hf.model_type, hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
      num_heads=hf.num_attention_heads, head_dim=hf.hidden_size // hf.num_attention_heads,
      intermediate_size=hf.intermediate_size, hidden_act=hf.hidden_act,
      layer_norm_eps=hf.layer_norm_eps, vocab_size=hf.vocab_size,
      max_position_embeddings=hf.max_position_embeddings, type_vocab_size=hf.type_vocab_size,
      pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else 0,
      embedding_size=getattr(hf, "embedding_size", None) or hf.hidden_size,
      position_ids="padding_offset" if hf.model_type == "roberta" else "absolute",
      hidden_dropout=hidden_dropout, attention_dropout=hf.attention_probs_dropout_prob,
      classifier_dropout=hidden_dropout if cls_dropout is None else cls_dropout)


class BertEmbeddings(nn.Module):
  """LN(E_word[x] + E_type[t] + E_pos[p]) of size cfg.embedding_size, before dropout.

  Lookups and the sum are in the parameter dtype (float32); the LayerNorm's output is the first
  tensor in cfg.dtype. Returns ([B, S, E] in cfg.dtype, the word table [V, E])."""

  cfg: L.ArchConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, packing=None):
    cfg = self.cfg
    size = cfg.embedding_size or cfg.hidden_size
    word = L.embed(cfg, cfg.vocab_size, size, "word_embeddings").embedding
    types = L.embed(cfg, cfg.type_vocab_size, size, "token_type_embeddings").embedding
    pos = L.embed(cfg, cfg.max_position_embeddings, size, "position_embeddings").embedding
    h = L.rows(word, input_ids) + L.rows(types, token_type_ids)
    if cfg.position_ids == "absolute" and packing is None:
      h = h + L.leading_rows(pos, input_ids.shape[1])
    else:
      h = h + L.rows(pos, L.positions(cfg, input_ids, packing))
    return L.layer_norm(cfg, "LayerNorm")(h), word


class BertAttention(nn.Module):
  """"attention": self-attention ("self") then AddNorm ("output", adapter where="attn")."""

  cfg: L.ArchConfig

  @nn.compact
  def __call__(self, h, mask, deterministic, output_attentions):
    a, probs = L.MultiHeadAttention(self.cfg, name="self")(h, mask, None, deterministic,
                                                          output_attentions)
    return L.AddNorm(self.cfg, where="attn", name="output")(a, h, deterministic), probs


class BertLayer(nn.Module):
  cfg: L.ArchConfig

  @nn.compact
  def __call__(self, h, mask, bias, deterministic, output_attentions):
    a, probs = BertAttention(self.cfg, name="attention")(h, mask, deterministic, output_attentions)
    y = L.Intermediate(self.cfg, name="intermediate")(a, deterministic)
    return L.AddNorm(self.cfg, where="ffn", name="output")(y, a, deterministic), probs


class BertBackbone(nn.Module):
  """inputs: input_ids int32 [B, S], attention_mask [B, S] (1 = token), token_type_ids [B, S];
  packed rows add segment_ids, position_ids [B, S] and example_start [E] (layers.Packing).
  Returns layers.BackboneOutput; `pooled` = tanh(W h_0 + b) when cfg.add_pooling_layer."""

  cfg: L.ArchConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, segment_ids=None,
               position_ids=None, example_start=None, *, deterministic=True,
               embedding_perturbation=None, output_hidden_states=False, output_attentions=False):
    cfg = self.cfg
    packing = L.Packing.from_inputs(segment_ids, position_ids, example_start)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    emb, table = BertEmbeddings(cfg, name="embeddings")(input_ids, token_type_ids, packing)
    mask = attention_mask.astype(bool)
    project = None
    if (cfg.embedding_size or cfg.hidden_size) != cfg.hidden_size:
      project = L.dense(cfg, cfg.hidden_size, "embeddings_project")
    h, hidden, attns = L.encode_embeddings(
        cfg, emb, mask, deterministic, embedding_perturbation, output_hidden_states,
        output_attentions, L.Encoder(cfg, BertLayer, name="encoder"), project, packing=packing)
    pooled = L.Pooler(cfg, name="pooler")(h, packing) if cfg.add_pooling_layer else None
    return L.BackboneOutput(h, emb, mask, pooled, hidden, attns, table, packing)
