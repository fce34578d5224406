"""DistilBERT (Sanh et al. 2019): a 6-layer BERT without token types or pooler, distilled from BERT.

Layer: a = LN_sa(h + W_out MHA(h)), h' = LN_out(a + Dropout(W_2 act(W_1 a))); embeddings
LN(E_word[x] + E_pos[p]) with LayerNorm epsilon 1e-12 everywhere (fixed in HF, not configurable).
HF names: embeddings/{word,position}_embeddings, transformer/layer_N/attention/{q,k,v,out}_lin,
sa_layer_norm, ffn/lin1, ffn/lin2, output_layer_norm. Sinusoidal position tables are ordinary
stored weights once trained, so they load like learned ones.
"""

from __future__ import annotations

import flax.linen as nn

from jaxft.models import layers as L
from jaxft.models.peft_layers import Adapter


def arch_from_hf(hf) -> dict:
  if hf.dim % hf.n_heads:
    raise ValueError(f"dim {hf.dim} is not a multiple of n_heads {hf.n_heads}")
  return dict(
      model_type="distilbert", hidden_size=hf.dim, num_layers=hf.n_layers, num_heads=hf.n_heads,
      head_dim=hf.dim // hf.n_heads, intermediate_size=hf.hidden_dim, hidden_act=hf.activation,
      layer_norm_eps=1e-12, vocab_size=hf.vocab_size,
      max_position_embeddings=hf.max_position_embeddings,
      pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else 0,
      hidden_dropout=hf.dropout, attention_dropout=hf.attention_dropout,
      classifier_dropout=hf.seq_classif_dropout, mlm_act=hf.activation)


class DistilBertEmbeddings(nn.Module):
  cfg: L.ArchConfig

  @nn.compact
  def __call__(self, input_ids, packing=None):
    cfg = self.cfg
    # float32 lookups and sum, the LayerNorm casts to cfg.dtype (see bert.BertEmbeddings).
    word = L.embed(cfg, cfg.vocab_size, cfg.hidden_size, "word_embeddings").embedding
    pos = L.embed(cfg, cfg.max_position_embeddings, cfg.hidden_size,
                  "position_embeddings").embedding
    if packing is None:
      h = L.rows(word, input_ids) + L.leading_rows(pos, input_ids.shape[1])
    else:  # positions restart in every packed example
      h = L.rows(word, input_ids) + L.rows(pos, L.positions(cfg, input_ids, packing))
    return L.layer_norm(cfg, "LayerNorm")(h), word


class FFN(nn.Module):
  """"ffn": Dropout(lin2(act(lin1 x))), then the ffn adapter."""

  cfg: L.ArchConfig

  @nn.compact
  def __call__(self, x, deterministic):
    cfg = self.cfg
    y = L.dense(cfg, cfg.intermediate_size, "lin1")(x, deterministic=deterministic)
    y = L.dense(cfg, cfg.hidden_size, "lin2")(L.activation(cfg.hidden_act)(y),
                                             deterministic=deterministic)
    y = nn.Dropout(cfg.hidden_dropout)(y, deterministic=deterministic)
    return Adapter(cfg.peft, where="ffn", dtype=cfg.dtype, name="adapter")(y)


class TransformerBlock(nn.Module):
  cfg: L.ArchConfig

  @nn.compact
  def __call__(self, h, mask, bias, deterministic, output_attentions):
    cfg = self.cfg
    # HF applies no residual dropout after out_lin in DistilBERT; only inside the FFN.
    a, probs = L.MultiHeadAttention(cfg, names=("q_lin", "k_lin", "v_lin", "out_lin"),
                                    name="attention")(h, mask, None, deterministic,
                                                      output_attentions)
    a = Adapter(cfg.peft, where="attn", dtype=cfg.dtype, name="attention_adapter")(a)
    a = L.layer_norm(cfg, "sa_layer_norm")(a + h)
    y = FFN(cfg, name="ffn")(a, deterministic)
    return L.layer_norm(cfg, "output_layer_norm")(y + a), probs


class DistilBertBackbone(nn.Module):
  """inputs: input_ids int32 [B, S], attention_mask [B, S]; token_type_ids is ignored (none in
  DistilBERT); packed rows add segment_ids, position_ids [B, S] and example_start [E]
  (layers.Packing). Returns layers.BackboneOutput (no pooler)."""

  cfg: L.ArchConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, segment_ids=None,
               position_ids=None, example_start=None, *, deterministic=True,
               embedding_perturbation=None, output_hidden_states=False, output_attentions=False):
    cfg = self.cfg
    packing = L.Packing.from_inputs(segment_ids, position_ids, example_start)
    emb, table = DistilBertEmbeddings(cfg, name="embeddings")(input_ids, packing)
    mask = attention_mask.astype(bool)
    h, hidden, attns = L.encode_embeddings(
        cfg, emb, mask, deterministic, embedding_perturbation, output_hidden_states,
        output_attentions, L.Encoder(cfg, TransformerBlock, name="transformer"), packing=packing)
    return L.BackboneOutput(h, emb, mask, None, hidden, attns, table, packing)
