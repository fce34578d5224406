"""Torn checkpoints, checkpoints of another model, and a disk that fills up during a save.

Torn saves (a leftover temporary directory, a step without its commit marker, a truncated array
file) are warned about and skipped, and restore falls back to the newest good step; the damaged
step is moved to checkpoints/damaged/ (not deleted) so that the resumed run can save it again.
"""

import errno
import json
import logging
import pathlib
import shutil

import pytest

from reliability_runs import (NUM_STEPS, assert_trees_bitwise_equal, load_config, losses_by_step,
                              saved_state)

# Orbax's reads of a truncated file fail inside its own event loop and leave "Event loop is
# closed" / "never awaited" noise behind; the restore itself has already failed over cleanly.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning",
                                        "ignore::RuntimeWarning")


@pytest.fixture(scope="module")
def target(reference):
  """The restore target (abstract TrainState) of the reference run's config."""
  from jaxft import config as config_lib
  from jaxft.train import checkpoint as ckpt_lib
  from jaxft.train.setup import build_setup
  setup = build_setup(config_lib.from_json((reference / "config.json").read_text()))
  return setup, ckpt_lib.abstract(setup.checkpointable(setup.state))


@pytest.fixture
def workdir(reference, tmp_path):
  """A copy of the reference workdir: latest/ holds steps 12, 15 and 16."""
  dst = tmp_path / "run"
  shutil.copytree(reference, dst)
  assert sorted(int(p.name) for p in (dst / "checkpoints/latest").iterdir()) == [12, 15, 16]
  return dst


def restore(workdir, target):
  from jaxft.train import checkpoint as ckpt_lib
  ckpts = ckpt_lib.Checkpoints(workdir, async_save=False)
  try:
    restored = ckpts.restore_latest(target[1])
  finally:
    ckpts.close()
  return restored


def truncate_arrays(step_dir: pathlib.Path) -> None:
  for f in (step_dir / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":  # OCDBT data files: the arrays' bytes
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def leftover_tmp(latest: pathlib.Path) -> None:
  shutil.copytree(latest / "16", latest / "17.orbax-checkpoint-tmp")
  (latest / "17.orbax-checkpoint-tmp" / "commit_success.txt").unlink()


@pytest.mark.parametrize("damage, want_step, warning", [
    (leftover_tmp, 16, "never finished"),
    (lambda latest: (latest / "16" / "commit_success.txt").unlink(), 15, "never committed"),
    (lambda latest: truncate_arrays(latest / "16"), 15, "unreadable"),
    (lambda latest: (latest / "16" / "meta" / "metadata").write_text('{"step": 1'), 15,
     "unreadable"),
], ids=["tmp-dir", "no-commit-marker", "truncated-array", "truncated-json"])
def test_torn_checkpoint_is_skipped_with_a_warning(workdir, target, damage, want_step, warning,
                                                   caplog):
  latest = workdir / "checkpoints" / "latest"
  damage(latest)
  with caplog.at_level(logging.WARNING, logger="jaxft.train.checkpoint"):
    state, meta = restore(workdir, target)
  assert meta["step"] == want_step and int(state.step) == want_step
  assert warning in caplog.text
  _, want = saved_state(workdir, want_step)
  assert_trees_bitwise_equal(target[0].checkpointable(state).trainable, want["trainable"])
  if want_step != 16:  # the damaged step went to damaged/, so it can be saved again
    assert not (latest / "16").exists()
    assert [p.name.split("-")[:2] for p in (workdir / "checkpoints/damaged").iterdir()] == [
        ["latest", "16"]]


def test_damaged_step_can_be_saved_again_after_fallback(workdir, target):
  """Before the fix the damaged step stayed on disk: re-saving it raised StepAlreadyExistsError
  (eval steps) or was silently skipped (so `latest` stayed the broken one)."""
  from jaxft.train import checkpoint as ckpt_lib
  truncate_arrays(workdir / "checkpoints/latest/16")
  ckpts = ckpt_lib.Checkpoints(workdir, keep=3, async_save=False)
  state, meta = ckpts.restore_latest(target[1])
  assert meta["step"] == 15
  ckpts.save(16, state, {**meta, "step": 16}, force=True)
  ckpts.wait()
  assert ckpts.latest_step() == 16
  _, meta16 = ckpts.restore_latest(target[1])
  ckpts.close()
  assert meta16["step"] == 16


def test_all_checkpoints_torn_means_a_fresh_start_not_a_crash(workdir, target, caplog):
  for step in (12, 15, 16):
    truncate_arrays(workdir / "checkpoints/latest" / str(step))
  with caplog.at_level(logging.WARNING, logger="jaxft.train.checkpoint"):
    assert restore(workdir, target) is None
  assert caplog.text.count("unreadable") == 3


def test_checkpoint_of_another_architecture_is_a_clear_error(workdir, tiny_model, tmp_path,
                                                             capsys):
  """Resuming (or evaluating) a workdir with a model of other shapes must not fall back to a
  fresh start (as the old catch-all did): it names the parameters that disagree."""
  import torch
  import transformers as T
  from jaxft import cli
  from jaxft.train.restore import load_workdir
  wider = tmp_path / "wider_bert"
  shutil.copytree(tiny_model, wider)
  torch.manual_seed(0)
  T.BertModel(T.BertConfig(vocab_size=T.AutoConfig.from_pretrained(tiny_model).vocab_size,
                           hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64)).save_pretrained(wider)
  # The model directory was replaced by another architecture under the same name.
  config = json.loads((workdir / "config.json").read_text())
  config["model"]["name"] = str(wider)
  (workdir / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"made for another model .*shapes differ: .*checkpoint "
                     r"\(\d+, 32\) vs model \(\d+, 48\).*Fix: resume with the model"):
    load_workdir(workdir, "latest")
  assert cli.main(["eval", "--workdir", str(workdir), "--which", "latest"]) == 2
  err = capsys.readouterr().err
  assert "jaxft eval: error: the checkpoint at step 16" in err and "Traceback" not in err
  assert sorted(p.name for p in (workdir / "checkpoints/latest").iterdir()) == ["12", "15", "16"]


@pytest.mark.slow
def test_disk_full_during_save_keeps_the_previous_checkpoint(reference, tiny_model, tmp_path,
                                                             monkeypatch):
  """ENOSPC in the middle of writing checkpoint 6 (in orbax's async commit): the run stops with
  one clear OSError, checkpoint 3 survives and restores, and running again finishes bitwise equal
  to the uninterrupted run."""
  from orbax.checkpoint._src.path import async_path
  from jaxft.train import loop
  workdir = tmp_path / "run"
  write_text = async_path.write_text

  async def full_disk_at_step_6(path, *args, **kwargs):
    if "/6.orbax-checkpoint-tmp" in str(path):
      raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return await write_text(path, *args, **kwargs)

  monkeypatch.setattr(async_path, "write_text", full_disk_at_step_6)
  config = load_config(tiny_model)
  with pytest.raises(OSError, match=r"disk full while writing a checkpoint.*previous checkpoint "
                     r"\(step 3\) is intact.*free space") as e:
    loop.train_and_evaluate(config, workdir)
  assert e.value.errno == errno.ENOSPC
  assert sorted(p.name for p in (workdir / "checkpoints/latest").glob("[0-9]")) == ["3"]

  monkeypatch.setattr(async_path, "write_text", write_text)  # space freed
  loop.train_and_evaluate(config, workdir)
  assert losses_by_step(workdir) == losses_by_step(reference)
  assert_trees_bitwise_equal(saved_state(workdir)[1], saved_state(reference)[1])
  assert saved_state(workdir)[0] == NUM_STEPS
