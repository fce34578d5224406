"""Does a fine-tuned model survive unstructured masking it was not trained for? Zeroes a fraction
of the encoder's prunable weights of a finished workdir at random, by magnitude and (for a
movement-pruning workdir) by its learned movement scores, and scores the validation split each
time. Also prints how many of the largest 0.1% of weights (by |W|) each mask removes. With a
third argument N, it adds the first-order (Taylor) ranking that movement pruning's scores
approximate, computed directly: S = sum over N training batches of -dL/dW * W (no optimizer).

    python benchmarks/diag/random_masks.py workdirs/prune_movement/cpu/dense/seed0 [0.13,0.26,0.5]
    python benchmarks/diag/random_masks.py workdirs/prune_movement/cpu/movement-0.9-3ep/seed0 0.1,0.2,0.3 50

docs/results.md's pruning section quotes it (MiniLM-L6 on MR, 2-core CPU VM). The workdir's restored
checkpoint is its best one; for a movement run whose best evaluation came before masking began,
that is the weights and scores the first mask was cut from.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxft.objectives import prune
from jaxft.train.evaluate import Evaluator
from jaxft.train.restore import load_workdir
from jaxft.core.state import flatten, unflatten


def taylor_scores(setup, state, paths, n_batches: int) -> dict:
  """sum_t -dL/dW * W over the first n_batches training batches, dropout off, weights fixed."""
  flat = flatten(setup.eval_params(state.trainable, state.frozen, state.extras))
  kernels = {p: flat[p] for p in paths}
  rest = {k: v for k, v in flat.items() if k not in kernels}

  def loss(kernels, batch):
    logits = setup.apply_fn(unflatten({**rest, **kernels}), batch, deterministic=True).logits
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return jnp.sum(ce * batch["example_mask"]) / jnp.maximum(jnp.sum(batch["example_mask"]), 1.0)

  grad = jax.jit(jax.grad(loss))
  total = {p: jnp.zeros_like(v) for p, v in kernels.items()}
  for t in range(n_batches):
    batch = {k: jnp.asarray(v) for k, v in setup.data.train.batch_at(t).items()}
    g = grad(kernels, batch)
    total = {p: total[p] - g[p] * kernels[p] for p in total}
  return total


def largest_removed(weights: dict, masks: dict, top: float = 0.001) -> float:
  """Fraction of the top `top` share of weights by |W| (over all masked matrices) that masks zero."""
  flat_w = np.concatenate([np.abs(np.asarray(weights[p])).ravel() for p in masks])
  flat_m = np.concatenate([np.asarray(masks[p]).ravel() for p in masks])
  k = max(int(top * flat_w.size), 1)
  largest = np.argpartition(flat_w, -k)[-k:]
  return float(1.0 - flat_m[largest].mean())


def main(workdir, fractions="0.13,0.26,0.5", taylor_batches="0"):
  setup, state = load_workdir(workdir)
  flat = {**state.frozen, **state.trainable}
  paths = prune.prunable_paths(flat)
  weights = {p: flat[p] for p in paths}
  scores = {p: flat[f"{prune.SCORES}/{p}"] for p in paths if f"{prune.SCORES}/{p}" in flat}
  print(f"{workdir}: step {int(state.step)}, {len(paths)} prunable matrices"
        + (", movement scores present" if scores else ""))
  taylor = taylor_scores(setup, state, paths, int(taylor_batches)) if int(taylor_batches) else None
  rng = np.random.default_rng(0)
  ev = Evaluator(setup)
  for s in (float(x) for x in fractions.split(",")):
    random_scores = {p: jnp.asarray(rng.normal(size=flat[p].shape), jnp.float32) for p in paths}
    rankings = [("random", prune.topk_masks(random_scores, s)),
                ("magnitude", prune.magnitude_masks(weights, s))]
    if len(scores) == len(paths):
      rankings.append(("movement scores", prune.topk_masks(scores, s)))
    if taylor is not None:
      rankings.append((f"-dL/dW * W over {taylor_batches} batches", prune.topk_masks(taylor, s)))
    for name, masks in rankings:
      masked = state.replace(trainable=prune.apply_masks(state.trainable, masks))
      print(f"{s:.0%} of encoder weights zeroed by {name}: "
            f"accuracy {100 * ev.evaluate(masked)['accuracy']:.1f}, "
            f"largest 0.1% of |W| removed: {100 * largest_removed(weights, masks):.1f}%", flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
