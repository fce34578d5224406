"""Adversarial and smoothness objectives on the embedding output: FGM, PGD, FreeLB, SMART, VAT, R3F.

Each objective is the supervised term "sup" (jaxft.objectives.supervised, weight `sup_weight`) plus
an adversarial term "adv" (weight `adv_weight`); SMART adds the Bregman proximal term "prox". A
weight of 0 drops its term (and its forward pass). Every term works for the task kinds
classification, regression and token_classification (per-token losses over tokens labelled other
than -100). The math of perturbations, norms and divergences is in `jaxft.objectives.perturb`.

One dropout rng is shared by all forward passes inside a term (the attack and the loss), so the
attack targets the same stochastic sub-network the loss is taken on, and a divergence between clean
and perturbed predictions measures the perturbation alone, not two dropout draws.

Packed batches (jaxft.data.packing): delta is [R, L, H]; every norm, projection, random start and
noise draw is per example through base.layout_of(batch) (jaxft.objectives.perturb), so a packed
example is attacked exactly as it is in a padded batch.

Cost per step, in forward+backward passes of the model: sup 1, FGM 2, PGD K+1, FreeLB K
(K forward+backward for the losses, K-1 for the ascent), SMART 2 + K (+1 for the teacher), VAT
2 + power_iterations, R3F 2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.objectives import perturb as P
from jaxft.objectives.base import StepContext, Weighted, example_weights, layout_of
from jaxft.objectives.registry import Objective, register
from jaxft.objectives.supervised import masked_mean, task_term
from jaxft.core.state import flatten, unflatten

sg = jax.lax.stop_gradient
UNLABELED = "unlabeled/"
TEACHER = "smart_teacher"


def attack_loss(sup_term, apply_fn, params, batch, rng, ctx, **fixed):
  """delta -> the supervised loss at x + delta with the parameters held fixed (stop_gradient).
  `fixed` binds apply_fn keywords, e.g. deterministic=True for evaluation."""
  frozen = sg(params)

  def loss_of_delta(delta):
    return sup_term(P.with_perturbation(apply_fn, delta, **fixed), frozen, batch, rng, ctx)[0]

  return loss_of_delta


def _norm_metric(delta, norm, batch):
  return masked_mean(P.per_example_norm(delta, norm, layout_of(batch)), example_weights(batch))


def fgm_term(kind: str, *, epsilon: float, norm: str = "l2", label_smoothing: float = 0.0):
  """FGM (Miyato et al. 2017): L(x + r_adv), r_adv = eps * g / ||g||_2, g = dL/dr at r = 0, per
  example and stop-gradiented; norm="linf" gives FGSM's eps * sign(g). Metrics: the supervised
  metrics under the attack and `delta_norm`."""
  P.check_norm(norm)
  sup = task_term(kind, label_smoothing)

  def term(apply_fn, params, batch, rng, ctx: StepContext):
    shape = P.embedding_shape(apply_fn, params, batch)
    mask = P.token_mask(batch, shape)
    delta = P.fgm_delta(attack_loss(sup, apply_fn, params, batch, rng, ctx), shape, mask,
                        epsilon=epsilon, norm=norm, layout=layout_of(batch))
    loss, metrics = sup(P.with_perturbation(apply_fn, delta), params, batch, rng, ctx)
    return loss, {**metrics, "delta_norm": _norm_metric(delta, norm, batch)}

  return term


def pgd_term(kind: str, *, epsilon: float, alpha: float, steps: int, norm: str = "l2",
             random_init: bool = True, label_smoothing: float = 0.0):
  """PGD-K (Madry et al. 2018): K projected ascent steps of size alpha in the eps-ball (optionally
  from a uniform random start), then the supervised loss at the final delta (stop-gradiented)."""
  P.check_norm(norm)
  sup = task_term(kind, label_smoothing)

  def term(apply_fn, params, batch, rng, ctx: StepContext):
    shape = P.embedding_shape(apply_fn, params, batch)
    mask = P.token_mask(batch, shape)
    delta = P.pgd_delta(attack_loss(sup, apply_fn, params, batch, rng, ctx), shape, mask,
                        epsilon=epsilon, alpha=alpha, steps=steps, norm=norm,
                        rng=jax.random.fold_in(rng, 1), random_init=random_init,
                        layout=layout_of(batch))
    loss, metrics = sup(P.with_perturbation(apply_fn, delta), params, batch, rng, ctx)
    return loss, {**metrics, "delta_norm": _norm_metric(delta, norm, batch)}

  return term


def freelb_init(rng, shape, mask, norm: str, init_mag: float, layout=None) -> jax.Array:
  """FreeLB's start: L2: U(-1, 1) * init_mag / sqrt(L_b * H) (L_b real tokens of example b);
  L-inf: U(-init_mag, init_mag). Padding stays 0."""
  layout = layout or P.rows(mask)
  u = layout.draw(lambda k, s: jax.random.uniform(k, s, jnp.float32, -1.0, 1.0), rng,
                  shape) * mask
  if P.check_norm(norm) == "linf":
    return u * init_mag
  dims = layout.sum(mask) * shape[-1]
  return u * layout.spread(init_mag / jnp.sqrt(jnp.maximum(dims, 1.0)), u)


def freelb_deltas(loss_of_delta, delta0, mask, *, steps: int, alpha: float, epsilon: float,
                  norm: str, layout=None) -> list[jax.Array]:
  """The K perturbations FreeLB takes its losses at: delta_0, and delta_{k+1} =
  Proj_eps(delta_k + alpha * g_k / ||g_k||) (per-example L2, or max-|g| for L-inf as in the paper's
  code); eps <= 0 leaves delta unbounded. All stop-gradiented."""
  deltas = [sg(delta0)]
  for _ in range(steps - 1):
    g = P.delta_grad(loss_of_delta, deltas[-1]) * mask
    step = deltas[-1] + alpha * P.normalize(g, norm, layout)
    deltas.append(sg(P.project(step, norm, epsilon, layout) * mask))
  return deltas


def freelb_term(kind: str, *, steps: int, alpha: float, epsilon: float = 0.0, init_mag: float = 0.0,
                norm: str = "l2", label_smoothing: float = 0.0):
  """FreeLB (Zhu et al. 2020): (1/K) sum_k L(x + delta_k) over K ascent steps. Its parameter
  gradient is the average of the K adversarial gradients FreeLB accumulates ("free" training)."""
  if steps < 1:
    raise ValueError(f"freelb steps must be >= 1, got {steps}")
  P.check_norm(norm)
  sup = task_term(kind, label_smoothing)

  def term(apply_fn, params, batch, rng, ctx: StepContext):
    shape = P.embedding_shape(apply_fn, params, batch)
    mask = P.token_mask(batch, shape)
    layout = layout_of(batch)
    delta0 = freelb_init(jax.random.fold_in(rng, 1), shape, mask, norm, init_mag, layout)
    # A Python loop, not scan: the ascent after the last loss is dead code XLA then removes.
    deltas = freelb_deltas(attack_loss(sup, apply_fn, params, batch, rng, ctx), delta0, mask,
                           steps=steps, alpha=alpha, epsilon=epsilon, norm=norm, layout=layout)
    results = [sup(P.with_perturbation(apply_fn, d), params, batch, rng, ctx) for d in deltas]
    loss = sum(r[0] for r in results) / steps
    metrics = {k: sum(r[1][k] for r in results) / steps for k in results[0][1]}
    return loss, {**metrics, "delta_norm": _norm_metric(deltas[-1], norm, batch)}

  return term


def smart_delta(div_of_delta, shape, mask, rng, *, noise_std: float, step_size: float,
                epsilon: float, steps: int, norm: str = "linf", layout=None) -> jax.Array:
  """SMART's inner maximisation (Jiang et al. 2020, Algorithm 1): delta ~ N(0, sigma^2 I), then
  `steps` times delta <- Proj_eps(delta + eta * g / ||g||) with g = d l_s / d delta (||.||_inf
  normalisation for the L-inf ball, as in the paper). Stop-gradiented."""
  layout = layout or P.rows(mask)
  delta = layout.draw(_normal, rng, shape) * noise_std * mask
  for _ in range(steps):
    g = P.delta_grad(div_of_delta, delta) * mask
    delta = P.project(delta + step_size * P.normalize(g, norm, layout), norm, epsilon,
                      layout) * mask
  return sg(delta)


def _normal(rng, shape):
  return jax.random.normal(rng, shape, jnp.float32)


def smart_term(kind: str, *, epsilon: float, noise_std: float, step_size: float, steps: int,
               norm: str = "linf"):
  """SMART's smoothness-inducing adversarial regularizer R_s = l_s(f(x), f(x + delta*)): symmetric
  KL between clean and perturbed predictions (squared error for regression), each KL direction with
  its target stop-gradiented as in the authors' mt-dnn code."""
  P.check_norm(norm)

  def term(apply_fn, params, batch, rng, ctx: StepContext):
    clean = apply_fn(params, batch, rng=rng, deterministic=False).logits
    w = P.prediction_weights(kind, batch)
    frozen, clean_c = sg(params), sg(clean)

    def div_of_delta(delta):
      adv = apply_fn(frozen, batch, rng=rng, deterministic=False, embedding_perturbation=delta)
      return P.divergence(kind, clean_c, adv.logits, w, mode="each")

    shape = P.embedding_shape(apply_fn, params, batch)
    mask = P.token_mask(batch, shape)
    delta = smart_delta(div_of_delta, shape, mask, jax.random.fold_in(rng, 1), noise_std=noise_std,
                        step_size=step_size, epsilon=epsilon, steps=steps, norm=norm,
                        layout=layout_of(batch))
    adv = apply_fn(params, batch, rng=rng, deterministic=False, embedding_perturbation=delta).logits
    loss = P.divergence(kind, clean, adv, w, mode="each")
    return loss, {"delta_norm": _norm_metric(delta, norm, batch)}

  return term


def bregman_term(kind: str, teacher_key: str = TEACHER):
  """SMART's Bregman proximal point term D_Breg(theta, theta~) = l_s(f(x; theta), f(x; theta~)),
  theta~ the momentum (EMA) teacher in ctx.extras[teacher_key] (flat trainable paths; frozen
  leaves are shared). The teacher is a constant: no gradient reaches it."""

  def term(apply_fn, params, batch, rng, ctx: StepContext):
    if teacher_key not in ctx.extras:
      raise KeyError(f"the Bregman proximal term needs state.extras[{teacher_key!r}]; build the state "
                     "with the objective's init_extras")
    teacher = unflatten({**flatten(params), **sg(ctx.extras[teacher_key])})
    student = apply_fn(params, batch, rng=rng, deterministic=False).logits
    target = sg(apply_fn(teacher, batch, rng=rng, deterministic=False).logits)
    return P.divergence(kind, target, student, P.prediction_weights(kind, batch), mode="none"), {}

  return term


def ema_teacher(momentum: float, teacher_key: str = TEACHER):
  """(init_extras, update_extras) of a momentum teacher theta~_{t+1} = beta theta~_t +
  (1 - beta) theta_{t+1}, started at theta_0 (SMART's momentum Bregman proximal point)."""

  def init_extras(trainable, frozen):
    return {teacher_key: jax.tree_util.tree_map(jnp.array, trainable)}

  def update_extras(old_state, new_state, metrics):
    teacher = jax.tree_util.tree_map(
        lambda t, p: (momentum * t + (1.0 - momentum) * p).astype(t.dtype),
        new_state.extras[teacher_key], new_state.trainable)
    return {**new_state.extras, teacher_key: teacher}

  return init_extras, update_extras


def vat_delta(div_of_delta, shape, mask, rng, *, epsilon: float, xi: float,
              power_iterations: int = 1, layout=None) -> jax.Array:
  """VAT's r_adv (Miyato et al. 2018): d ~ N(0, I); repeat d <- grad_r D(r)|_{r = xi d/||d||};
  r_adv = eps * d / ||d||_2 per example. Stop-gradiented."""
  layout = layout or P.rows(mask)
  d = layout.draw(_normal, rng, shape) * mask
  for _ in range(power_iterations):
    d = P.delta_grad(div_of_delta, xi * P.normalize(d, "l2", layout)) * mask
  return sg(epsilon * P.normalize(d, "l2", layout) * mask)


def vat_part_loss(kind, apply_fn, params, part, rng, *, epsilon, xi, power_iterations):
  """(mean LDS of one batch part, its total row weight). LDS = KL(sg(p(x)) || p(x + r_adv))."""
  clean = apply_fn(params, part, rng=rng, deterministic=False).logits
  w = P.prediction_weights(kind, part)
  frozen, clean_c = sg(params), sg(clean)

  def div_of_delta(delta):
    adv = apply_fn(frozen, part, rng=rng, deterministic=False, embedding_perturbation=delta)
    return P.divergence(kind, clean_c, adv.logits, w, mode="target")

  shape = P.embedding_shape(apply_fn, params, part)
  delta = vat_delta(div_of_delta, shape, P.token_mask(part, shape), jax.random.fold_in(rng, 1),
                    epsilon=epsilon, xi=xi, power_iterations=power_iterations,
                    layout=layout_of(part))
  adv = apply_fn(params, part, rng=rng, deterministic=False, embedding_perturbation=delta).logits
  return P.divergence(kind, clean, adv, w, mode="target"), jnp.sum(w)


def unlabeled_part(batch):
  """The batch's "unlabeled/<key>" arrays with the prefix removed, or None when it has none.
  Deeper views ("unlabeled/strong/<key>", augmentations for consistency objectives) are left out."""
  part = {k[len(UNLABELED):]: v for k, v in batch.items()
          if k.startswith(UNLABELED) and "/" not in k[len(UNLABELED):]}
  return part or None


def labeled_part(batch):
  return {k: v for k, v in batch.items() if not k.startswith(UNLABELED)}


def vat_term(kind: str, *, epsilon: float, xi: float, power_iterations: int = 1,
             use_unlabeled: bool = True):
  """VAT's local distributional smoothness loss. Needs no labels: with use_unlabeled and an
  "unlabeled/..." part in the batch it is the mean over the rows of both parts (labeled part with
  rng fold_in(rng, 0), unlabeled part with fold_in(rng, 1))."""

  def term(apply_fn, params, batch, rng, ctx: StepContext):
    kw = dict(epsilon=epsilon, xi=xi, power_iterations=power_iterations)
    loss, n = vat_part_loss(kind, apply_fn, params, labeled_part(batch), jax.random.fold_in(rng, 0),
                            **kw)
    metrics = {"lds_labeled": loss}
    unlabeled = unlabeled_part(batch) if use_unlabeled else None
    if unlabeled is not None:
      loss_u, n_u = vat_part_loss(kind, apply_fn, params, unlabeled, jax.random.fold_in(rng, 1), **kw)
      metrics["lds_unlabeled"] = loss_u
      loss = (loss * n + loss_u * n_u) / jnp.maximum(n + n_u, 1.0)
    return loss, metrics

  return term


def r3f_noise(rng, shape, mask, *, noise_std: float, noise_type: str = "normal",
              layout=None) -> jax.Array:
  """R3F's z: N(0, sigma^2 I) or U(-sigma, sigma) per coordinate at real tokens."""
  layout = layout or P.rows(mask)
  if noise_type == "normal":
    return layout.draw(_normal, rng, shape) * noise_std * mask
  if noise_type == "uniform":
    uniform = lambda k, s: jax.random.uniform(k, s, jnp.float32, -noise_std, noise_std)
    return layout.draw(uniform, rng, shape) * mask
  raise ValueError(f"r3f noise_type must be 'normal' or 'uniform', got {noise_type!r}")


def r3f_term(kind: str, *, noise_std: float, noise_type: str = "normal"):
  """R3F (Aghajanyan et al. 2020): KL_S(f(x) || f(x + z)), symmetric KL with gradients into both
  predictions (fairseq's implementation); squared error for regression. z from fold_in(rng, 1)."""

  def term(apply_fn, params, batch, rng, ctx: StepContext):
    clean = apply_fn(params, batch, rng=rng, deterministic=False).logits
    shape = P.embedding_shape(apply_fn, params, batch)
    z = r3f_noise(jax.random.fold_in(rng, 1), shape, P.token_mask(batch, shape),
                  noise_std=noise_std, noise_type=noise_type, layout=layout_of(batch))
    noisy = apply_fn(params, batch, rng=rng, deterministic=False, embedding_perturbation=z).logits
    return P.divergence(kind, clean, noisy, P.prediction_weights(kind, batch), mode="none"), {}

  return term


# ------------------------------------------------------------------------------------------------
# Registered objectives


def _objective(options, info, adv, **more) -> Objective:
  terms = {"sup": Weighted(task_term(info.kind, options.label_smoothing), options.sup_weight),
           "adv": Weighted(adv, options.adv_weight)}
  terms.update(more)
  return Objective(terms={k: v for k, v in terms.items() if v.weight != 0})


_COMMON = {"sup_weight": 1.0, "adv_weight": 1.0, "label_smoothing": 0.0}


@register("fgm", defaults={**_COMMON, "epsilon": 1.0, "norm": "l2"})
def fgm(options, info) -> Objective:
  return _objective(options, info, fgm_term(info.kind, epsilon=options.epsilon, norm=options.norm,
                                            label_smoothing=options.label_smoothing))


@register("pgd", defaults={**_COMMON, "epsilon": 1.0, "alpha": 0.3, "steps": 3, "norm": "l2",
                           "random_init": True})
def pgd(options, info) -> Objective:
  return _objective(options, info, pgd_term(
      info.kind, epsilon=options.epsilon, alpha=options.alpha, steps=options.steps,
      norm=options.norm, random_init=options.random_init, label_smoothing=options.label_smoothing))


# FreeLB trains on the perturbed losses only (sup_weight 0); init_mag/alpha/epsilon follow the
# scale of its GLUE settings (adv-init-mag, adv-lr, adv-max-norm 0 = unbounded).
@register("freelb", defaults={**_COMMON, "sup_weight": 0.0, "steps": 3, "alpha": 0.1,
                              "epsilon": 0.0, "init_mag": 0.1, "norm": "l2"})
def freelb(options, info) -> Objective:
  return _objective(options, info, freelb_term(
      info.kind, steps=options.steps, alpha=options.alpha, epsilon=options.epsilon,
      init_mag=options.init_mag, norm=options.norm, label_smoothing=options.label_smoothing))


# SMART paper settings: sigma = 1e-5, eta = 1e-3, eps = 1e-5, one ascent step, lambda_s = 1,
# mu = 1, beta = 0.99.
@register("smart", defaults={**_COMMON, "prox_weight": 1.0, "momentum": 0.99, "epsilon": 1e-5,
                             "noise_std": 1e-5, "step_size": 1e-3, "steps": 1, "norm": "linf"})
def smart(options, info) -> Objective:
  adv = smart_term(info.kind, epsilon=options.epsilon, noise_std=options.noise_std,
                   step_size=options.step_size, steps=options.steps, norm=options.norm)
  init_extras, update_extras = ema_teacher(options.momentum)
  obj = _objective(options, info, adv, prox=Weighted(bregman_term(info.kind), options.prox_weight))
  if "prox" in obj.terms:
    obj.init_extras, obj.update_extras = init_extras, update_extras
  return obj


# xi = 0.1 and a per-sequence L2 radius follow Miyato et al.'s text code
# (small_constant_for_finite_diff); a tinier xi vanishes under float32 rounding of the embeddings.
@register("vat", defaults={**_COMMON, "epsilon": 1.0, "xi": 0.1, "power_iterations": 1,
                           "use_unlabeled": True})
def vat(options, info) -> Objective:
  return _objective(options, info, vat_term(info.kind, epsilon=options.epsilon, xi=options.xi,
                                            power_iterations=options.power_iterations,
                                            use_unlabeled=options.use_unlabeled))


@register("r3f", defaults={**_COMMON, "noise_std": 1e-5, "noise_type": "normal"})
def r3f(options, info) -> Objective:
  return _objective(options, info, r3f_term(info.kind, noise_std=options.noise_std,
                                            noise_type=options.noise_type))
