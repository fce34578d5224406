"""DeBERTa-v2 / v3 (He et al. 2021; He et al. 2023): post-LN layers with disentangled attention.

Attention (He et al. 2021, eq. 4) adds to the content scores two relative-position terms, read
from one shared table of 2k relative embeddings P (`encoder/rel_embeddings`, LayerNorm-ed when
norm_rel_ebd = "layer_norm"), projected per layer by W_q, W_k (share_att_key) or their own
`pos_query_proj` / `pos_key_proj`:

    A_ij = (q_i k_j^T + q_i (P W_k)_{c(i,j)}^T + k_j (P W_q)_{c(i,j)}^T) / sqrt(d * s)
                        [content -> position, c2p]  [position -> content, p2c]

with c(i, j) = clip(bucket(i - j) + k, 0, 2k - 1) (the paper writes delta(j, i) in the p2c term;
the released code, which the checkpoints were trained with, indexes both terms by i - j, since
bucket() is odd), s = 1 + the number of c2p / p2c terms, and
k = position_buckets (or max_relative_positions when there are no buckets). bucket() is identity
for |i - j| < k / 2 and log-spaced beyond, up to max_relative_positions (v3's 256 buckets over 512).
Embeddings: LN(E_word[x] (+ E_pos[p] when position_biased_input) (+ E_type[t])), projected by
`embed_proj` when embedding_size != hidden_size, times the attention mask. Optional ConvLayer
(conv_kernel_size > 0, DeBERTa-v2 xlarge/xxlarge) after the first layer. Padding queries attend
uniformly to every key, as the reference's [B, 1, S, S] mask does.
Packed rows (layers.Packing): positions, relative positions and the attention mask are per
example (i - j from position_ids, block-diagonal mask), and the ConvLayer reads no tap across an
example boundary, so every example gets what it gets alone in a padded row.
HF names: embeddings/{word,position,token_type}_embeddings, encoder/{rel_embeddings, LayerNorm,
conv/{conv,LayerNorm}}, encoder/layer_N/attention/{self/{query,key,value}_proj,
output/{dense,LayerNorm}}, encoder/layer_N/{intermediate/dense, output/{dense,LayerNorm}}.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models import layers as L
from jaxft.models.peft_layers import Prefix

POS_ATT_TYPES = ("c2p", "p2c")


@dataclasses.dataclass(frozen=True)
class DebertaArch(L.ArchConfig):
  """ArchConfig plus DeBERTa's options (HF names where HF has one).

  relative_attention: add the c2p / p2c terms (else plain scaled dot-product attention).
  pos_att_type: which of ("c2p", "p2c") are added; each also raises the scale s by one.
  position_buckets: k, the number of relative-position buckets per direction (0: none, then
    k = max_relative_positions and distances are clipped, not log-bucketed).
  max_relative_positions: the largest distance the log buckets reach.
  share_att_key: project P with the content W_q / W_k instead of pos_{query,key}_proj.
  norm_rel_ebd: LayerNorm ("encoder/LayerNorm") over the relative embeddings.
  position_biased_input: add absolute position embeddings to the input (v2: yes, v3: no).
  conv_kernel_size / conv_groups / conv_act: the ConvLayer after layer 0 (0: none).
  pooler_dropout: ContextPooler's dropout before its dense.
  legacy_mlm: the MLM head is BERT's cls/predictions (True) or lm_predictions/lm_head (False).
  """

  relative_attention: bool = False
  pos_att_type: tuple = ()
  position_buckets: int = 0
  max_relative_positions: int = 512
  share_att_key: bool = False
  norm_rel_ebd: bool = False
  position_biased_input: bool = True
  conv_kernel_size: int = 0
  conv_groups: int = 1
  conv_act: str = "tanh"
  pooler_dropout: float = 0.0
  legacy_mlm: bool = True

  @property
  def span(self) -> int:
    """k: half the number of relative embeddings (the table has 2k rows)."""
    return self.position_buckets if self.position_buckets > 0 else self.max_relative_positions

  @property
  def scale_factor(self) -> int:
    return 1 + sum(t in self.pos_att_type for t in POS_ATT_TYPES)


def arch_from_hf(hf) -> dict:
  """DebertaArch fields from a transformers DebertaV2Config."""
  heads = hf.num_attention_heads
  head_dim = getattr(hf, "attention_head_size", None)
  if head_dim is None:
    if hf.hidden_size % heads:
      raise ValueError(f"hidden_size {hf.hidden_size} is not a multiple of num_attention_heads "
                       f"{heads}")
    head_dim = hf.hidden_size // heads
  kernel = getattr(hf, "conv_kernel_size", 0) or 0
  if kernel > 0 and kernel % 2 == 0:
    raise ValueError(f"conv_kernel_size={kernel}: the ConvLayer keeps the sequence length only for "
                     "odd kernels")
  pooler_size = getattr(hf, "pooler_hidden_size", hf.hidden_size)
  if pooler_size != hf.hidden_size:
    raise ValueError(f"pooler_hidden_size={pooler_size} must equal hidden_size={hf.hidden_size}: "
                     "the classifier reads hidden_size features")
  max_rel = getattr(hf, "max_relative_positions", -1)
  types = hf.pos_att_type or []
  types = [t.strip().lower() for t in (types.split("|") if isinstance(types, str) else types)]
  norm = [x.strip() for x in str(getattr(hf, "norm_rel_ebd", "none")).lower().split("|")]
  cls_dropout = getattr(hf, "cls_dropout", None)
  return dict(
      model_type=hf.model_type, hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
      num_heads=heads, head_dim=head_dim, intermediate_size=hf.intermediate_size,
      hidden_act=hf.hidden_act, layer_norm_eps=hf.layer_norm_eps, vocab_size=hf.vocab_size,
      max_position_embeddings=hf.max_position_embeddings, type_vocab_size=hf.type_vocab_size,
      pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else 0,
      embedding_size=getattr(hf, "embedding_size", None) or hf.hidden_size,
      hidden_dropout=hf.hidden_dropout_prob, attention_dropout=hf.attention_probs_dropout_prob,
      classifier_dropout=hf.hidden_dropout_prob if cls_dropout is None else cls_dropout,
      pooler_size=pooler_size, pooler_act=hf.pooler_hidden_act,
      relative_attention=bool(getattr(hf, "relative_attention", False)),
      pos_att_type=tuple(t for t in POS_ATT_TYPES if t in types),
      position_buckets=max(int(getattr(hf, "position_buckets", -1)), 0),
      max_relative_positions=hf.max_position_embeddings if max_rel < 1 else max_rel,
      share_att_key=bool(getattr(hf, "share_att_key", False)),
      norm_rel_ebd="layer_norm" in norm,
      position_biased_input=bool(getattr(hf, "position_biased_input", True)),
      conv_kernel_size=kernel, conv_groups=getattr(hf, "conv_groups", 1),
      conv_act=getattr(hf, "conv_act", "tanh"),
      pooler_dropout=float(getattr(hf, "pooler_dropout", 0.0)),
      legacy_mlm=bool(getattr(hf, "legacy", True)))


def log_bucket_position(rel: np.ndarray, bucket_size: int, max_position: int) -> np.ndarray:
  """Relative distances -> buckets: r for |r| <= k/2, else sign(r) (k/2 + ceil((k/2 - 1)
  log(|r| / (k/2)) / log((max_position - 1) / (k/2)))), in float32 like the reference."""
  mid = bucket_size // 2
  abs_pos = np.where((rel < mid) & (rel > -mid), mid - 1, np.abs(rel))
  f32 = np.float32
  with np.errstate(divide="ignore"):
    scaled = np.log(abs_pos.astype(f32) / f32(mid)) / np.log(f32((max_position - 1) / mid))
    log_pos = np.ceil(scaled * f32(mid - 1)) + f32(mid)
  return np.where(abs_pos <= mid, rel, log_pos * np.sign(rel)).astype(np.int64)


def bucket(cfg: DebertaArch, rel: np.ndarray) -> np.ndarray:
  """int64 bucket(rel) of relative distances rel (any shape): log buckets or rel itself."""
  if cfg.position_buckets > 0:
    rel = log_bucket_position(rel, cfg.position_buckets, cfg.max_relative_positions)
  return rel


def relative_positions(cfg: DebertaArch, length: int) -> np.ndarray:
  """int64 [S, S]: bucket(i - j) for query i and key j."""
  pos = np.arange(length)
  return bucket(cfg, pos[:, None] - pos[None, :])


def relative_positions_rows(cfg: DebertaArch, position_ids):
  """int32 [B, S, S]: bucket(pos[b, i] - pos[b, j]) from per-row position ids [B, S] (packed
  rows, where positions restart in every example). A lookup in the numpy buckets of every
  distance -(S-1)..S-1, so they agree with relative_positions to the integer (XLA's float32 log
  may differ from numpy's in the last bit)."""
  s = position_ids.shape[1]
  table = jnp.asarray(bucket(cfg, np.arange(-(s - 1), s)).astype(np.int32))
  return jnp.take(table, position_ids[:, :, None] - position_ids[:, None, :] + (s - 1))


def _gather_last(x, idx):
  """x [B, N, S, R] and static idx [S, S'] -> x[..., s, idx[s, t]]: [B, N, S, S']. The index
  keeps size-1 batch and head axes, so the gather slices them instead of materialising
  B N S S' indices."""
  return jnp.take_along_axis(x, jnp.asarray(idx, jnp.int32)[None, None], axis=-1)


def _gather_rows(x, idx):
  """x [B, N, S, R] and idx [B, S, S'] -> x[b, n, s, idx[b, s, t]]: [B, N, S, S']."""
  return jnp.take_along_axis(x, idx[:, None], axis=-1)


def relative_scores(cfg: DebertaArch, q, k, pos: dict, rows=None):
  """c2p + p2c scores [B, N, S, S] float32, before the 1 / sqrt(d s) scale.

  q, k: [B, S, N, d] content queries / keys; pos: {"c2p": P W_k, "p2c": P W_q}, each [2k, N, d].
  c2p[b, n, i, j] = q_i . (P W_k)_{c(i, j)};  p2c[b, n, i, j] = k_j . (P W_q)_{c(i, j)}, with
  c(i, j) = clip(bucket(i - j) + k, 0, 2k - 1): scores against all 2k positions, then a gather.
  rows: None (i - j of row offsets, a static index) or int32 [B, S, S] bucket(pos_i - pos_j) of
  packed rows (relative_positions_rows), gathered per row.
  """
  span, f32 = cfg.span, jnp.float32
  if rows is None:
    rel, clip, gather = relative_positions(cfg, q.shape[1]), np.clip, _gather_last
  else:
    rel, clip, gather = rows, jnp.clip, _gather_rows
  score = jnp.zeros((), f32)
  if "c2p" in pos:
    c2p = jnp.einsum("btnd,rnd->bntr", q, pos["c2p"].astype(q.dtype), preferred_element_type=f32)
    score = score + gather(c2p, clip(rel + span, 0, 2 * span - 1))
  if "p2c" in pos:
    p2c = jnp.einsum("bsnd,rnd->bnsr", k, pos["p2c"].astype(k.dtype), preferred_element_type=f32)
    # [b, n, j, i] = p2c[b, n, j, clip(-bucket(j - i) + k)], then transposed to [b, n, i, j].
    p2c = gather(p2c, clip(-rel + span, 0, 2 * span - 1))
    score = score + jnp.swapaxes(p2c, -1, -2)
  return score


class DisentangledSelfAttention(nn.Module):
  """"self": softmax((content + c2p + p2c) / sqrt(d s), masked) V; prefix keys (PEFT) get no
  relative terms. x [B, S, H], mask bool [B, S] or, packed, [B, S, S] (block-diagonal);
  rel: (P [2k, H] or None, packed rows' relative buckets [B, S, S] or None).
  Returns (out [B, S, N d], probs [B, N, S, P + S] float32 or None)."""

  cfg: DebertaArch

  @nn.compact
  def __call__(self, x, mask, rel, deterministic, output_attentions):
    cfg = self.cfg
    rel, rows = rel  # the relative embeddings P, the packed rows' buckets
    b, s, _ = x.shape
    n, d = cfg.num_heads, cfg.head_dim
    names = ("query_proj", "key_proj", "value_proj")
    proj = {name: L.dense(cfg, n * d, name) for name in names}
    q, k, v = (proj[name](x, deterministic=deterministic).reshape(b, s, n, d) for name in names)
    f32 = jnp.float32
    scale = np.sqrt(np.float32(d) * np.float32(cfg.scale_factor))
    logits = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=f32) / scale
    if cfg.relative_attention and cfg.pos_att_type:
      r = nn.Dropout(cfg.hidden_dropout)(rel, deterministic=deterministic)
      pos_proj = {t: proj[shared] if cfg.share_att_key else L.dense(cfg, n * d, own)
                  for t, shared, own in (("c2p", "key_proj", "pos_key_proj"),
                                         ("p2c", "query_proj", "pos_query_proj"))
                  if t in cfg.pos_att_type}
      pos = {t: layer(r, deterministic=deterministic).reshape(r.shape[0], n, d)
             for t, layer in pos_proj.items()}
      logits = logits + relative_scores(cfg, q, k, pos, rows) / scale
    prefix = Prefix(cfg.peft, num_heads=n, head_dim=d, name="prefix")()
    keys = mask
    if prefix is not None:
      # Prefix-tuning (Li & Liang 2021): P learned keys/values in front, always attended to.
      pk, pv = (jnp.broadcast_to(p.astype(k.dtype)[None], (b,) + p.shape) for p in prefix)
      k, v = jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1)
      p_len = prefix[0].shape[0]
      keys = L.prepend_keys(mask, p_len)
      prefix_logits = jnp.einsum("btnd,bsnd->bnts", q, pk, preferred_element_type=f32) / scale
      logits = jnp.concatenate([prefix_logits, logits], -1)
    if mask.ndim == 3:  # packed: the block-diagonal mask already pairs queries with keys
      allowed = keys[:, None]
    else:
      # The reference masks with m_i m_j: a padding query sees only masked scores, so a uniform
      # row.
      allowed = mask[:, None, :, None] & keys[:, None, None, :]
    probs = jax.nn.softmax(jnp.where(allowed, logits, f32(-1e30)), axis=-1)
    dropped = nn.Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
    out = jnp.einsum("bnts,bsnd->btnd", dropped.astype(v.dtype), v).reshape(b, s, n * d)
    return out, (probs if output_attentions else None)


class DebertaAttention(nn.Module):
  """"attention": disentangled self-attention ("self") then AddNorm ("output")."""

  cfg: DebertaArch

  @nn.compact
  def __call__(self, h, mask, rel, deterministic, output_attentions):
    a, probs = DisentangledSelfAttention(self.cfg, name="self")(h, mask, rel, deterministic,
                                                                output_attentions)
    return L.AddNorm(self.cfg, where="attn", name="output")(a, h, deterministic), probs


class DebertaLayer(nn.Module):
  """One layer; `rel` (the relative embeddings [2k, H] and the packed rows' relative buckets
  [B, S, S], either None) sits in the slot other families use for an attention bias, so
  L.maybe_remat applies unchanged."""

  cfg: DebertaArch

  @nn.compact
  def __call__(self, h, mask, rel, deterministic, output_attentions):
    a, probs = DebertaAttention(self.cfg, name="attention")(h, mask, rel, deterministic,
                                                            output_attentions)
    y = L.Intermediate(self.cfg, name="intermediate")(a, deterministic)
    return L.AddNorm(self.cfg, where="ffn", name="output")(y, a, deterministic), probs


def segment_conv(conv, x, segment_ids, pad: int):
  """conv(x) of packed rows with every tap outside the output token's example read as zero, as
  the example alone in a padded row reads padding. x [B, S, C], segment_ids [B, S]; conv a
  "same" Conv1d of half-width pad. Returns [B, S, C'] (padding positions: anything).

  Examples are coloured by their rank in the row mod (pad + 1), so the examples within pad tokens
  of a token (ranks s - pad .. s + pad) all differ in colour from its own (rank s); conv of x
  restricted to one colour is then exact at that colour's tokens. pad + 1 convolutions (2 for
  DeBERTa's kernel of 3) instead of per-tap masking."""
  real = segment_ids > 0
  before = jnp.pad(segment_ids, ((0, 0), (1, 0)))[:, :-1]
  colour = jnp.cumsum((real & (segment_ids != before)).astype(jnp.int32), axis=1) % (pad + 1)
  out = None
  for c in range(pad + 1):
    keep = ((colour == c) & real)[..., None]
    y = conv(jnp.where(keep, x, jnp.zeros((), x.dtype)))
    out = y if out is None else jnp.where(keep, y, out)
  return out


class ConvLayer(nn.Module):
  """"conv": mask * LN(residual + act(Dropout(mask * Conv1d(x)))) over the encoder input x;
  mask bool [B, S]; packed rows (segment_ids [B, S]) convolve per example (segment_conv)."""

  cfg: DebertaArch

  @nn.compact
  def __call__(self, x, residual, mask, deterministic, segment_ids=None):
    cfg = self.cfg
    pad = (cfg.conv_kernel_size - 1) // 2
    conv = nn.Conv(cfg.hidden_size, (cfg.conv_kernel_size,), padding=[(pad, pad)],
                   feature_group_count=cfg.conv_groups, dtype=cfg.dtype,
                   param_dtype=cfg.param_dtype, kernel_init=nn.initializers.normal(0.02),
                   name="conv")
    out = conv(x) if segment_ids is None else segment_conv(conv, x, segment_ids, pad)
    m = mask[..., None]
    out = jnp.where(m, out, jnp.zeros((), out.dtype))
    out = L.activation(cfg.conv_act)(nn.Dropout(cfg.hidden_dropout)(out,
                                                                     deterministic=deterministic))
    y = L.layer_norm(cfg, "LayerNorm")(residual + out)
    return y * m.astype(y.dtype)


class DebertaEncoder(nn.Module):
  """"encoder": the relative embeddings (shared by all layers), the layers, the ConvLayer.
  mask: bool [B, S], or with packing (layers.Packing) its block-diagonal [B, S, S]."""

  cfg: DebertaArch

  @nn.compact
  def __call__(self, h, mask, packing, deterministic, output_hidden_states, output_attentions):
    cfg = self.cfg
    rel, rows = None, None
    if cfg.relative_attention:
      rel = L.embed(cfg, 2 * cfg.span, cfg.hidden_size, "rel_embeddings").embedding
      if cfg.norm_rel_ebd:
        rel = L.layer_norm(cfg, "LayerNorm")(rel)
      if packing is not None:
        rows = relative_positions_rows(cfg, packing.position_ids)
    layer_cls = L.maybe_remat(cfg, DebertaLayer)
    x, hidden, attns = h, [h], []
    for i in range(cfg.num_layers):
      h, probs = layer_cls(cfg, name=f"layer_{i}")(h, mask, (rel, rows), deterministic,
                                                   output_attentions)
      if i == 0 and cfg.conv_kernel_size > 0:
        conv = ConvLayer(cfg, name="conv")
        if packing is None:
          h = conv(x, h, mask, deterministic)
        else:
          h = conv(x, h, packing.segment_ids > 0, deterministic, packing.segment_ids)
      hidden.append(h)
      attns.append(probs)
    return (h, tuple(hidden) if output_hidden_states else None,
            tuple(attns) if output_attentions else None)


class DebertaEmbeddings(nn.Module):
  """mask * LN(embed_proj(E_word[x] + E_pos[p] + E_type[t])), before dropout.

  Lookups and the sum are float32 (the parameter dtype); the LayerNorm's output is in cfg.dtype.
  Returns ([B, S, H] in cfg.dtype, the word table [V, E])."""

  cfg: DebertaArch

  @nn.compact
  def __call__(self, input_ids, token_type_ids, mask, packing=None):
    cfg = self.cfg
    size = cfg.embedding_size or cfg.hidden_size
    word = L.embed(cfg, cfg.vocab_size, size, "word_embeddings").embedding
    h = L.rows(word, input_ids)
    if cfg.position_biased_input:
      pos = L.embed(cfg, cfg.max_position_embeddings, size, "position_embeddings").embedding
      if packing is None:
        h = h + L.leading_rows(pos, input_ids.shape[1])
      else:  # positions restart in every packed example
        h = h + L.rows(pos, L.positions(cfg, input_ids, packing))
    if cfg.type_vocab_size > 0:
      types = L.embed(cfg, cfg.type_vocab_size, size, "token_type_embeddings").embedding
      h = h + L.rows(types, token_type_ids)
    if size != cfg.hidden_size:
      h = L.dense(cfg, cfg.hidden_size, "embed_proj", use_bias=False)(h)
    h = L.layer_norm(cfg, "LayerNorm")(h)
    return h * mask[..., None].astype(h.dtype), word


class DebertaV2Backbone(nn.Module):
  """inputs: input_ids int32 [B, S], attention_mask [B, S] (1 = token), token_type_ids [B, S]
  (read only when type_vocab_size > 0); packed rows add segment_ids, position_ids [B, S] and
  example_start [E] (layers.Packing). Returns layers.BackboneOutput (no pooler: DeBERTa's
  ContextPooler belongs to the sequence head, see ContextPooler below, which heads.pool feeds
  one pooled token per example)."""

  cfg: DebertaArch

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, segment_ids=None,
               position_ids=None, example_start=None, *, deterministic=True,
               embedding_perturbation=None, output_hidden_states=False, output_attentions=False):
    cfg = self.cfg
    if cfg.attention_impl not in (None, "xla"):
      raise ValueError(f"attention_impl={cfg.attention_impl!r}: deberta-v2 attention adds "
                       "query-dependent relative terms and always runs on the XLA path; use "
                       "attention_impl=None or 'xla'")
    packing = L.Packing.from_inputs(segment_ids, position_ids, example_start)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    mask = attention_mask.astype(bool)
    emb, table = DebertaEmbeddings(cfg, name="embeddings")(input_ids, token_type_ids, mask,
                                                           packing)
    encoder = DebertaEncoder(cfg, name="encoder")

    def encode(h, mask, bias, *flags):
      del bias  # the relative terms come from the encoder's own embeddings
      return encoder(h, mask, packing, *flags)

    h, hidden, attns = L.encode_embeddings(
        cfg, emb, mask, deterministic, embedding_perturbation, output_hidden_states,
        output_attentions, encode, packing=packing)
    return L.BackboneOutput(h, emb, mask, None, hidden, attns, table, packing)


# ----------------------------------------------------------------------------- task-head parts


def _dense(cfg, features: int, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  kernel_init=nn.initializers.normal(0.02), name=name)


class ContextPooler(nn.Module):
  """"pooler" of the sequence head (HF ContextPooler): act(dense(Dropout(x))), x [B, H] the
  pooled token (h_0 with pooling "cls"; [E, H], one per example, for packed rows). heads.SequenceHead puts classifier(Dropout(.)) on top."""

  cfg: DebertaArch

  @nn.compact
  def __call__(self, x, deterministic):
    cfg = self.cfg
    x = nn.Dropout(cfg.pooler_dropout)(x, deterministic=deterministic)
    return L.activation(cfg.pooler_act)(_dense(cfg, cfg.pooler_size or cfg.hidden_size, "dense")(x))


def _transform(cfg, h, features: int):
  """LN(act(dense h)) with "dense" and "LayerNorm" created in the calling module."""
  h = L.activation(cfg.hidden_act)(_dense(cfg, features, "dense")(h))
  return L.layer_norm(cfg, "LayerNorm")(h)


class Transform(nn.Module):
  cfg: DebertaArch
  features: int

  @nn.compact
  def __call__(self, h):
    return _transform(self.cfg, h, self.features)


class Predictions(nn.Module):
  """LN(act(W h)) E^T + b with the word table E [V, E]. Legacy ("predictions"): the transform is
  its own "transform" module and maps to the embedding size; else ("lm_head") dense and LayerNorm
  sit beside the bias and keep the hidden size (which must then equal the embedding size)."""

  cfg: DebertaArch

  @nn.compact
  def __call__(self, h, table):
    cfg = self.cfg
    if cfg.legacy_mlm:
      h = Transform(cfg, table.shape[1], name="transform")(h)
    else:
      h = _transform(cfg, h, cfg.hidden_size)
    bias = self.param("bias", nn.initializers.zeros, (table.shape[0],), cfg.param_dtype)
    return jnp.dot(h, table.astype(h.dtype).T) + bias.astype(h.dtype)


class MLMHead(nn.Module):
  """DeBERTa's MLM head; heads.MLMHead names it "cls" (legacy, cls/predictions as BERT's) or
  "lm_predictions" (lm_predictions/lm_head). Logits [B, S, V]."""

  cfg: DebertaArch

  @nn.compact
  def __call__(self, h, table):
    name = "predictions" if self.cfg.legacy_mlm else "lm_head"
    return Predictions(self.cfg, name=name)(h, table)
