"""Orbax checkpoints of the whole train state plus the data iterator position.

Two managers under <workdir>/checkpoints: `latest/` (the last `keep` saves, for resuming) and
`best/` (the single best eval so far, for the final model). Each save holds `state` (the TrainState
pytree) and `meta` (JSON: data iterator state, step, best metric so far, trainable-parameter
bookkeeping). Orbax writes to a temporary directory and renames it on commit, so a crash during a
save leaves the previous checkpoint readable.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpoints:

  def __init__(self, workdir: str | pathlib.Path, keep: int = 2, async_save: bool = True):
    root = pathlib.Path(workdir).absolute() / "checkpoints"
    self.root = root

    def manager(name, max_to_keep):
      options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save)
      return ocp.CheckpointManager(root / name, options=options,
                                   item_names=("state", "meta"))

    self.latest = manager("latest", max(keep, 1))
    self.best = manager("best", 1)

  def save(self, step: int, state, meta: dict, *, best: bool = False, force: bool = False) -> None:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    self.latest.save(step, args=args, force=force)
    if best:
      self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def _restore(self, manager, step, abstract_state) -> tuple[Any, dict]:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_latest(self, abstract_state) -> tuple[Any, dict] | None:
    """Newest readable checkpoint, falling back to older ones if the newest is damaged."""
    for step in sorted(self.latest.all_steps(), reverse=True):
      try:
        return self._restore(self.latest, step, abstract_state)
      except Exception as e:  # a torn or truncated save: warn, try the one before
        log.warning("checkpoint at step %d is unreadable (%s: %s); trying an older one",
                    step, type(e).__name__, str(e)[:200])
    return None

  def restore_best(self, abstract_state) -> tuple[Any, dict] | None:
    step = self.best.latest_step()
    if step is None:
      return None
    return self._restore(self.best, step, abstract_state)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def abstract(tree):
  """ShapeDtypeStructs (with shardings) of a live pytree, as restore targets."""
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
