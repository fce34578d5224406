"""Evaluation: a jitted forward over every eval example once, then metrics on the host.

The forward is jitted once per bucket shape; predictions and labels come back to the host, padding
rows (example_mask = 0) are dropped, and `jaxft.eval.metrics.compute` names the numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxft.eval import metrics as metrics_lib
from jaxft.train import mesh as mesh_lib
from jaxft.train.state import merge_params


def predictions_from_logits(kind: str, logits: np.ndarray) -> np.ndarray:
  """classification: argmax [B]; regression: logits[:, 0] [B]; token classification: argmax [B, S]."""
  if kind == "regression":
    return logits[..., 0]
  return np.argmax(logits, axis=-1)


def make_eval_fn(apply_fn, mesh):
  replicated = NamedSharding(mesh, P())

  def forward(trainable, frozen, batch):
    out = apply_fn(merge_params(trainable, frozen), batch, deterministic=True)
    return out.logits.astype(jnp.float32)

  return jax.jit(forward, out_shardings=replicated)


class Evaluator:

  def __init__(self, setup, split: str | None = None):
    self.setup = setup
    self.split = split or setup.config.data.eval_split
    if self.split not in setup.data.eval:
      raise KeyError(f"no eval split {self.split!r}; the task has {sorted(setup.data.eval)}")
    self._fn = make_eval_fn(setup.model.apply, setup.mesh)

  def logits_and_labels(self, state):
    """-> (logits [N, ...] float32, labels [N, ...]) over the real examples of the split, in order."""
    all_logits, all_labels = [], []
    for batch in self.setup.data.eval[self.split]():
      keep = np.asarray(batch["example_mask"]) > 0
      device_batch = mesh_lib.put_batch(batch, self.setup.mesh)
      logits = np.asarray(jax.device_get(self._fn(state.trainable, state.frozen, device_batch)))
      all_logits.append(logits[keep])
      all_labels.append(np.asarray(batch["labels"])[keep])
    return np.concatenate(all_logits), np.concatenate(all_labels)

  def evaluate(self, state) -> dict:
    info = self.setup.data.info
    logits, labels = self.logits_and_labels(state)
    preds = predictions_from_logits(info.kind, logits)
    return metrics_lib.compute(info, preds, labels)
