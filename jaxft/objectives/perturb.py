"""Embedding-space perturbations: norms, projections, ascent steps, attacks and divergences.

The perturbation `delta` is a float32 [B, S, H] array added to the model's embedding output
(`ModelOutput.embeddings`, via `apply_fn(..., embedding_perturbation=delta)`). Every norm is per
example, over all of that example's token positions and hidden units:

    ||delta_b||_2   = sqrt(sum_{s,h} delta_bsh^2)      ||delta_b||_inf = max_{s,h} |delta_bsh|

Padding positions (attention_mask == 0) are kept at zero, so a bound on the norm is a bound on the
perturbation of the real tokens. In a packed batch (jaxft.data.packing) delta is [R, L, H] and
"example b" is a segment, not a row: norms, projections and random starts take an `ExampleLayout`
(base.layout_of(batch)), whose per-segment sums and maxima give every example the norm it has in a
padded batch, and whose draws give it the same noise; `layout=None` is the padded row-wise code. Attacks differentiate a loss w.r.t. `delta` with the parameters held
fixed (`stop_gradient`), and the delta they return is itself stop-gradiented: the parameter update
treats the adversarial example as a constant input, as in Goodfellow et al. (2015), Miyato et al.
(2017) and Madry et al. (2018), and no second-order term is built.

Divergences between two predictions (clean vs perturbed, student vs teacher) take the raw model
logits of one task kind: classification [B, C], token classification [B, S, C] (weighted per token),
regression [B, 1] (squared error of logits[..., 0]).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxft.objectives.base import IGNORE, ExampleLayout, example_weights, token_weights
from jaxft.objectives.supervised import masked_mean

NORMS = ("l2", "linf")
_TINY = 1e-12


def check_norm(norm: str, what: str = "norm") -> str:
  if norm not in NORMS:
    raise ValueError(f"{what} must be one of {', '.join(NORMS)}, got {norm!r}")
  return norm


# ------------------------------------------------------------------------------------------------
# Shapes and masks


def with_perturbation(apply_fn, delta, **fixed):
  """apply_fn with `embedding_perturbation=delta` (and any keyword in `fixed`, e.g.
  deterministic=True) bound, so a supervised loss term can be evaluated at x + delta unchanged."""

  def perturbed(params, batch, **kw):
    return apply_fn(params, batch, **{**kw, **fixed, "embedding_perturbation": delta})

  return perturbed


def embedding_shape(apply_fn, params, batch) -> tuple[int, ...]:
  """[B, S, H] of the embedding output, found by abstract evaluation (no FLOPs spent)."""
  out = jax.eval_shape(lambda p, b: apply_fn(p, b, rng=None, deterministic=True), params, batch)
  return tuple(out.embeddings.shape)


def token_mask(batch, shape) -> jax.Array:
  """float32 [B, S, 1]: 1 at real tokens (attention_mask), 0 at padding; ones when there is no mask."""
  if "attention_mask" in batch:
    return batch["attention_mask"].astype(jnp.float32)[:, :, None]
  return jnp.ones(shape[:2] + (1,), jnp.float32)


def rows(x) -> ExampleLayout:
  """The padded layout of x [B, ...]: example b is row b."""
  return ExampleLayout(int(x.shape[0]))


def per_example_norm(x: jax.Array, norm: str, layout: ExampleLayout | None = None) -> jax.Array:
  """[N] per-example L2 or L-inf norm of x [B, ...] (rows) or [R, L, ...] (packed layout)."""
  layout = layout or rows(x)
  if check_norm(norm) == "l2":
    return jnp.sqrt(layout.sum(jnp.square(x)))
  return layout.max(jnp.abs(x))


def _bcast(v, x, layout: ExampleLayout | None = None):
  return (layout or rows(x)).spread(v, x)


def normalize(g: jax.Array, norm: str, layout: ExampleLayout | None = None) -> jax.Array:
  """g / ||g|| per example (an all-zero row stays zero). With norm="linf" the row is divided by its
  largest |entry| (SMART's normalized step), not replaced by sign(g): see `ascent_direction`."""
  return g / _bcast(jnp.maximum(per_example_norm(g, norm, layout), _TINY), g, layout)


def ascent_direction(g: jax.Array, norm: str, layout: ExampleLayout | None = None) -> jax.Array:
  """Steepest-ascent direction of unit norm for the ball of `norm`: L2 -> g / ||g||_2 (FGM,
  Miyato et al. 2017), L-inf -> sign(g) (FGSM, Goodfellow et al. 2015; Madry et al. 2018)."""
  return normalize(g, "l2", layout) if check_norm(norm) == "l2" else jnp.sign(g)


def project(delta: jax.Array, norm: str, epsilon, layout: ExampleLayout | None = None) -> jax.Array:
  """Euclidean projection onto the per-example ball {||delta_b|| <= epsilon}. epsilon <= 0: no
  bound (FreeLB's adv_max_norm = 0)."""
  eps = jnp.asarray(epsilon, jnp.float32)
  if check_norm(norm) == "l2":
    n = per_example_norm(delta, "l2", layout)
    scale = jnp.where(n > eps, eps / jnp.maximum(n, _TINY), 1.0)
    projected = delta * _bcast(scale, delta, layout)
  else:
    projected = jnp.clip(delta, -eps, eps)
  return jnp.where(eps > 0, projected, delta)


def random_in_ball(rng, shape, mask, norm: str, epsilon,
                   layout: ExampleLayout | None = None) -> jax.Array:
  """A uniform draw from the per-example ball of radius epsilon over the real tokens.

  L-inf: U(-eps, eps) per coordinate. L2: a Gaussian direction scaled to radius eps * u^(1/d),
  u ~ U(0, 1), d = the example's number of real coordinates (Madry et al.'s random start).
  Packed: each example draws what it draws as a padded row (ExampleLayout.draw)."""
  eps = jnp.asarray(epsilon, jnp.float32)
  layout = layout or rows(mask)
  k_dir, k_rad = jax.random.split(rng)
  if check_norm(norm) == "linf":
    u = layout.draw(lambda k, s: jax.random.uniform(k, s, jnp.float32, -1.0, 1.0), k_dir, shape)
    return u * eps * mask
  d = normalize(layout.draw(lambda k, s: jax.random.normal(k, s, jnp.float32), k_dir, shape)
                * mask, "l2", layout)
  dims = jnp.maximum(layout.sum(mask) * shape[-1], 1.0)
  radius = eps * jax.random.uniform(k_rad, (layout.num,), jnp.float32) ** (1.0 / dims)
  return d * _bcast(radius, d, layout)


# ------------------------------------------------------------------------------------------------
# Attacks on a scalar loss of the perturbation


def delta_grad(loss_of_delta: Callable[[jax.Array], jax.Array], delta: jax.Array) -> jax.Array:
  """d loss / d delta. The caller's loss holds params fixed (stop_gradient), so only delta moves."""
  return jax.grad(loss_of_delta)(delta)


def fgm_delta(loss_of_delta, shape, mask, *, epsilon, norm: str = "l2",
              layout: ExampleLayout | None = None) -> jax.Array:
  """Fast gradient method: delta = eps * g / ||g||_2 (Miyato et al. 2017) or eps * sign(g) for L-inf
  (FGSM), g = d loss / d delta at delta = 0, per example. Returned stop-gradiented."""
  g = delta_grad(loss_of_delta, jnp.zeros(shape, jnp.float32)) * mask
  return jax.lax.stop_gradient(epsilon * ascent_direction(g, norm, layout) * mask)


def pgd_delta(loss_of_delta, shape, mask, *, epsilon, alpha, steps: int, norm: str = "l2",
              rng=None, random_init: bool = False,
              layout: ExampleLayout | None = None) -> jax.Array:
  """Projected gradient ascent (Madry et al. 2018): delta_0 = 0 or a uniform draw from the ball,
  delta_{k+1} = Proj_eps(delta_k + alpha * dir(g_k)) for k < steps, dir from `ascent_direction`.
  With steps=1, no random start and alpha = eps this is FGM. Returned stop-gradiented."""
  if steps < 1:
    raise ValueError(f"pgd steps must be >= 1, got {steps}")
  if random_init:
    if rng is None:
      raise ValueError("pgd with random_init=True needs an rng")
    delta = random_in_ball(rng, shape, mask, norm, epsilon, layout)
  else:
    delta = jnp.zeros(shape, jnp.float32)

  def body(_, delta):
    g = delta_grad(loss_of_delta, delta) * mask
    return project(delta + alpha * ascent_direction(g, norm, layout), norm, epsilon, layout) * mask

  # fori_loop keeps the compiled graph one ascent step long whatever `steps` is.
  delta = jax.lax.fori_loop(0, steps, body, delta)
  return jax.lax.stop_gradient(delta)


# ------------------------------------------------------------------------------------------------
# Divergences between predictions


def kl_logits(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
  """KL(P || Q) = sum_c P_c (log P_c - log Q_c) over the last axis, P = softmax(p_logits)."""
  log_p = jax.nn.log_softmax(p_logits.astype(jnp.float32), -1)
  log_q = jax.nn.log_softmax(q_logits.astype(jnp.float32), -1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)


def symmetric_kl(p_logits, q_logits, stop: str = "none") -> jax.Array:
  """KL(P || Q) + KL(Q || P) per row (Jiang et al. 2020; Aghajanyan et al. 2020).

  stop="none": gradients reach both sides (R3F, fairseq's implementation).
  stop="each": each direction treats its first argument as a fixed target,
    KL(sg(P) || Q) + KL(sg(Q) || P) (SMART, the mt-dnn implementation). Same value."""
  sg = jax.lax.stop_gradient
  if stop == "none":
    return kl_logits(p_logits, q_logits) + kl_logits(q_logits, p_logits)
  if stop == "each":
    return kl_logits(sg(p_logits), q_logits) + kl_logits(sg(q_logits), p_logits)
  raise ValueError(f"stop must be 'none' or 'each', got {stop!r}")


def prediction_weights(kind: str, batch) -> jax.Array:
  """Rows a divergence averages over: [N] real examples, or the tokens ([B, S], packed [R, L]) for
  token classification: those with a label other than -100 when labels are present, else real
  (attention_mask) tokens."""
  if kind != "token_classification":
    return example_weights(batch)
  if "labels" in batch:
    return token_weights(batch, batch["labels"])
  return token_weights(batch)


def divergence(kind: str, clean_logits, other_logits, weights, *, mode: str) -> jax.Array:
  """Mean divergence between two predictions over the weighted rows.

  Classification / token classification (KL per token):
    mode "target": KL(sg(P_clean) || P_other) (VAT: the clean prediction is a constant);
    mode "each":   symmetric KL with per-direction targets (SMART);
    mode "none":   symmetric KL, gradients into both (R3F).
  Regression (squared error of logits[..., 0], the SMART paper's l_s for regression):
    "target": (sg(y_c) - y_o)^2; "each": (sg(y_c) - y_o)^2 / 2 + (y_c - sg(y_o))^2 / 2;
    "none": (y_c - y_o)^2. All three have the value (y_c - y_o)^2.
  """
  sg = jax.lax.stop_gradient
  if kind == "regression":
    c = clean_logits[..., 0].astype(jnp.float32)
    o = other_logits[..., 0].astype(jnp.float32)
    if mode == "target":
      per = jnp.square(sg(c) - o)
    elif mode == "each":
      per = 0.5 * jnp.square(sg(c) - o) + 0.5 * jnp.square(c - sg(o))
    elif mode == "none":
      per = jnp.square(c - o)
    else:
      raise ValueError(f"divergence mode must be target/each/none, got {mode!r}")
  elif kind in ("classification", "token_classification"):
    if mode == "target":
      per = kl_logits(sg(clean_logits), other_logits)
    else:
      per = symmetric_kl(clean_logits, other_logits, stop=mode)
  else:
    raise ValueError(f"no divergence for task kind {kind!r}; known: classification, regression, "
                     "token_classification")
  return masked_mean(per, weights)
