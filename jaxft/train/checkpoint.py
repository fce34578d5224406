"""Orbax checkpoints of the whole train state plus the data iterator position.

Two managers under <workdir>/checkpoints: `latest/` (the last `keep` saves, for resuming) and
`best/` (the single best eval so far, for the final model). Each save holds `state` (the TrainState
pytree) and `meta` (JSON: data iterator state, step, best metric so far, trainable-parameter
bookkeeping). Orbax writes to a temporary directory and renames it on commit, so a crash during a
save leaves the previous checkpoint readable.

What a crash can leave behind, and what restore does with it:
  - `<step>.orbax-checkpoint-tmp-*` (killed mid-save): never a step to orbax; warned about.
  - a step directory without `commit_success.txt`, or one whose arrays or JSON do not read back
    (truncated files): warned about, moved to `checkpoints/damaged/`, and the next older step is
    tried. Moving it (not deleting it) lets the resumed run save that step again.
  - best/ without the step the resumed meta calls best (its save was cut off): copied from
    latest/, which eval steps also save (`recover_best`).
  - a checkpoint of another model (different trainable parameter names or shapes): a
    `CheckpointMismatch` error, never a silent restart from scratch.
Saving a step that is already on disk is a no-op: a resumed run is bitwise deterministic, so the
step holds the same state (this is what happens when SIGTERM arrives at a checkpoint step, or when
a run died after `best/` committed a step but before `latest/` did).

Several processes: every process makes the same save / restore calls (orbax's are collective) on
one directory they all see; each writes the array chunks it owns, process 0 the JSON `meta` and
the commit. Moving or copying a step (above) is process 0's, and the others wait for it.
"""

from __future__ import annotations

import errno
import logging
import pathlib
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

COMMIT_MARKER = "commit_success.txt"  # orbax writes it last, before the final rename
TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointMismatch(ValueError):
  """A checkpoint made for another model (parameter names or shapes differ)."""


def _is_disk_full(e: BaseException) -> bool:
  while e is not None:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    e = e.__cause__ or e.__context__
  return False


def _on_process_zero(fn, name: str) -> None:
  """Runs a filesystem change on process 0 only; every process returns once it is done."""
  if jax.process_index() == 0:
    fn()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"jaxft checkpoint: {name}")


class Checkpoints:

  def __init__(self, workdir: str | pathlib.Path, keep: int = 2, async_save: bool = True):
    root = pathlib.Path(workdir).absolute() / "checkpoints"
    self.root = root

    def manager(name, max_to_keep):
      options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save)
      return ocp.CheckpointManager(
          root / name, options=options,
          item_handlers={"state": ocp.StandardCheckpointHandler(),
                         "meta": ocp.JsonCheckpointHandler()})

    self.latest = manager("latest", max(keep, 1))
    self.best = manager("best", 1)

  # ------------------------------------------------------------------ saving

  def save(self, step: int, state, meta: dict, *, best: bool = False, force: bool = False) -> None:
    """Saves `step` to latest/ (and best/); a step already on disk is left as it is."""
    targets = [(self.latest, force)] + ([(self.best, True)] if best else [])
    for manager, forced in targets:
      if step in manager.all_steps():
        log.info("checkpoint for step %d already in %s; not saving it again", step,
                 manager.directory)
        continue
      args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
      self._guard(lambda: manager.save(step, args=args, force=forced), step)

  def _guard(self, fn, step=None):
    """Runs fn; a full disk (also one reported by an earlier async save) becomes one clear OSError
    that says the previous checkpoint is intact."""
    try:
      return fn()
    except Exception as e:  # orbax re-raises async errors wrapped; look down the chain
      if not _is_disk_full(e):
        raise
      kept = self.latest.latest_step()
      where = f" at step {step}" if step is not None else ""
      raise OSError(errno.ENOSPC,
                    f"disk full while writing a checkpoint{where} under {self.root}. The previous "
                    f"checkpoint ({'step ' + str(kept) if kept is not None else 'none yet'}) is "
                    "intact. Fix: free space there (or lower train.keep_checkpoints) and run the "
                    "same command again to resume from it.") from e

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  # ------------------------------------------------------------------ restoring

  def _restore(self, manager, step, abstract_state) -> tuple[Any, dict]:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def _check_same_model(self, manager, step, abstract_state) -> None:
    """Raises CheckpointMismatch when the saved trainable parameters are not the model's."""
    want = getattr(abstract_state, "trainable", None)
    if want is None:  # not a TrainState: nothing to compare
      return
    saved = manager.item_metadata(step)["state"]["trainable"]
    missing = sorted(set(want) - set(saved))
    extra = sorted(set(saved) - set(want))
    shapes = [f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(want[k].shape)}"
              for k in sorted(set(want) & set(saved))
              if tuple(saved[k].shape) != tuple(want[k].shape)]
    if not (missing or extra or shapes):
      return
    parts = []
    for label, items in (("shapes differ", shapes), ("missing in the checkpoint", missing),
                         ("only in the checkpoint", extra)):
      if items:
        parts.append(f"{label}: {'; '.join(items[:3])}{' ...' if len(items) > 3 else ''}")
    raise CheckpointMismatch(
        f"the checkpoint at step {step} in {manager.directory} was made for another model "
        f"({len(shapes) + len(missing) + len(extra)} trainable parameters disagree; "
        f"{' | '.join(parts)}). Fix: resume with the model and PEFT settings it was trained with, "
        "or start a new --workdir.")

  def _newest_readable(self, manager, abstract_state) -> tuple[Any, dict] | None:
    for tmp in sorted(p.name for p in pathlib.Path(manager.directory).glob(f"*{TMP_MARKER}*")):
      log.warning("ignoring %s/%s: a checkpoint save that never finished (the run died while "
                  "writing it)", manager.directory, tmp)
    steps = sorted(manager.all_steps(), reverse=True)
    marked = {s: (self._step_dir(manager, s) / COMMIT_MARKER).exists() for s in steps}
    for step in steps:
      if any(marked.values()) and not marked[step]:
        self._set_aside(manager, step, f"no {COMMIT_MARKER}: the save never committed")
        continue
      try:
        metadata_ok = True
        self._check_same_model(manager, step, abstract_state)
      except CheckpointMismatch:
        raise
      except Exception as e:  # unreadable metadata: a torn save
        metadata_ok = False
        reason = f"{type(e).__name__}: {str(e)[:200]}"
      if metadata_ok:
        try:
          return self._restore(manager, step, abstract_state)
        except Exception as e:  # a truncated array or JSON file
          reason = f"{type(e).__name__}: {str(e)[:200]}"
      self._set_aside(manager, step, f"unreadable ({reason})")
    return None

  def _step_dir(self, manager, step) -> pathlib.Path:
    return pathlib.Path(manager.directory) / str(step)

  def _set_aside(self, manager, step, why: str) -> None:
    src = self._step_dir(manager, step)
    dst = self.root / "damaged" / f"{pathlib.Path(manager.directory).name}-{step}-{int(time.time())}"
    log.warning("checkpoint at step %d in %s is %s; moved it to %s and trying an older one", step,
                manager.directory, why, dst)

    def move():
      if src.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dst))

    _on_process_zero(move, f"set aside {src}")
    manager.reload()

  def restore_latest(self, abstract_state) -> tuple[Any, dict] | None:
    """Newest readable checkpoint in latest/, falling back to older ones if the newest is damaged.
    None when there is none; CheckpointMismatch when it belongs to another model."""
    return self._newest_readable(self.latest, abstract_state)

  def restore_best(self, abstract_state) -> tuple[Any, dict] | None:
    """The best/ checkpoint, or None when there is none readable."""
    return self._newest_readable(self.best, abstract_state)

  def recover_best(self, best_step: int | None) -> None:
    """After a crash, best/ may lack the step the resumed meta calls best (its async save was cut
    off). Eval steps save latest/ too, so copy that step over when latest/ has it; else warn:
    best/ will only hold the next improvement."""
    if best_step is None or best_step in self.best.all_steps():
      return
    src = self._step_dir(self.latest, best_step)
    if best_step in self.latest.all_steps() and (src / COMMIT_MARKER).exists():
      _on_process_zero(lambda: shutil.copytree(src, self._step_dir(self.best, best_step)),
                       f"recover best step {best_step}")
      self.best.reload()
      log.warning("best checkpoint (step %d) was lost in a crash; restored it from latest/",
                  best_step)
    else:
      log.warning("best checkpoint (step %d) was lost in a crash and latest/ no longer holds that "
                  "step; best/ will hold the next improvement only", best_step)

  def wait(self) -> None:
    self._guard(self.latest.wait_until_finished)
    self._guard(self.best.wait_until_finished)

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def abstract(tree):
  """ShapeDtypeStructs (with shardings) of a live pytree, as restore targets."""
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
