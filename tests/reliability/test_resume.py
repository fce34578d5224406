"""A run killed at any moment resumes to exactly the uninterrupted run: losses, params, optimizer.

Each test kills a real `python -m jaxft train` process (SIGKILL mid-training, SIGKILL while an
async checkpoint is being committed, SIGTERM as a preemption notice), runs the same command again,
and compares with the shared uninterrupted `reference` run bit for bit.
"""

import pathlib
import re
import signal

import pytest

from reliability_runs import (NUM_STEPS, assert_trees_bitwise_equal, finish, last_train_step,
                              losses_by_step, rows, run, saved_state, start, train_argv, wait_until)

# Holds the commit of checkpoint step 9 open for a minute (orbax writes commit_success.txt just
# before its atomic rename), so that the test can SIGKILL the process mid-save every time.
SLOW_COMMIT_OF_STEP_9 = """
import asyncio, sys
from orbax.checkpoint._src.path import async_path
_write_text = async_path.write_text

async def slow_write_text(path, *args, **kwargs):
  if "/9.orbax-checkpoint-tmp" in str(path):
    print("HOLDING-COMMIT-OF-STEP-9", flush=True)
    await asyncio.sleep(60)
  return await _write_text(path, *args, **kwargs)

async_path.write_text = slow_write_text
from jaxft.cli import main
sys.exit(main(sys.argv[1:]))
"""


def assert_matches_reference(workdir, reference) -> None:
  """Every step's loss and grad norm (the last row written for it) and the final checkpointed
  state (trainable params, optimizer state, extras, step) equal the reference run's, bitwise."""
  got, want = losses_by_step(workdir), losses_by_step(reference)
  assert sorted(got) == list(range(1, NUM_STEPS + 1))
  assert got == want
  step, state = saved_state(workdir)
  ref_step, ref_state = saved_state(reference)
  assert step == ref_step == NUM_STEPS
  assert_trees_bitwise_equal(state, ref_state)
  # The best checkpoint too: best/ is what eval and export read.
  assert_trees_bitwise_equal(saved_state(workdir, which="best"), saved_state(reference, which="best"))


def committed_steps(workdir) -> list[int]:
  latest = pathlib.Path(workdir) / "checkpoints" / "latest"
  return [int(p.name) for p in latest.glob("*") if p.name.isdigit()] if latest.is_dir() else []


def resumed_from(log: str) -> int:
  found = re.findall(r"resumed from step (\d+)", log)
  assert found, f"the second run did not resume:\n{log[-3000:]}"
  return int(found[-1])


@pytest.mark.slow
def test_sigkill_mid_training_resumes_bitwise(reference, tiny_model, tmp_path):
  workdir = tmp_path / "run"
  argv = train_argv(workdir, tiny_model)
  proc = start(argv, tmp_path / "killed.txt")
  # Past step 5 and with one checkpoint committed (async saves can still be in flight: a kill
  # then loses them, which is what the next test is about).
  wait_until(lambda: last_train_step(workdir) >= 5 and committed_steps(workdir), proc,
             tmp_path / "killed.txt", what="step 5 and a committed checkpoint")
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = last_train_step(workdir)
  newest = max(committed_steps(workdir))
  assert 5 <= killed_at < NUM_STEPS, "the kill must land mid-run"
  # What the killed run logged before dying already matched the reference.
  ref = losses_by_step(reference)
  assert losses_by_step(workdir) == {s: ref[s] for s in range(1, killed_at + 1)}

  log = run(argv, tmp_path / "resumed.txt")
  assert resumed_from(log) == newest
  first_new = [r["step"] for r in rows(workdir)][killed_at]  # the row after the killed run's
  assert first_new == newest + 1
  assert_matches_reference(workdir, reference)


@pytest.mark.slow
def test_sigkill_during_async_checkpoint_commit_resumes_bitwise(reference, tiny_model, tmp_path):
  workdir = tmp_path / "run"
  argv = train_argv(workdir, tiny_model)
  log_path = tmp_path / "killed.txt"
  proc = start(argv, log_path, python_code=SLOW_COMMIT_OF_STEP_9)
  latest = workdir / "checkpoints" / "latest"
  wait_until(lambda: "HOLDING-COMMIT-OF-STEP-9" in log_path.read_text(), proc, log_path,
             what="the commit of checkpoint 9")
  tmp_dirs = [p.name for p in latest.iterdir() if ".orbax-checkpoint-tmp" in p.name]
  assert any(name.startswith("9.") for name in tmp_dirs), sorted(p.name for p in latest.iterdir())
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (latest / "9").exists()  # the torn save never became step 9

  log = run(argv, tmp_path / "resumed.txt")
  assert "never finished" in log  # the leftover temporary directory is reported
  assert resumed_from(log) == 8  # the newest committed checkpoint (the eval at step 8)
  assert_matches_reference(workdir, reference)


@pytest.mark.slow
def test_sigterm_checkpoints_exits_cleanly_and_resumes_at_next_step(reference, tiny_model,
                                                                    tmp_path):
  workdir = tmp_path / "run"
  argv = train_argv(workdir, tiny_model)
  log_path = tmp_path / "preempted.txt"
  proc = start(argv, log_path)
  wait_until(lambda: last_train_step(workdir) >= 4, proc, log_path, what="step 4")
  proc.send_signal(signal.SIGTERM)
  log = finish(proc, log_path)
  assert proc.returncode == 0, log[-3000:]
  found = re.findall(r"SIGTERM: saved a checkpoint at step (\d+) in .*; run the same command "
                     r"again to resume", log)
  assert found, log[-3000:]
  stopped = int(found[0])
  assert 4 <= stopped < NUM_STEPS
  assert stopped == last_train_step(workdir)  # the checkpoint is of the step it had reached
  assert (workdir / "checkpoints" / "latest" / str(stopped)).is_dir()
  assert [r["step"] for r in rows(workdir, "info") if r.get("preempted")] == [stopped]
  assert "Traceback" not in log

  log = run(argv, tmp_path / "resumed.txt")
  assert resumed_from(log) == stopped
  assert [r["step"] for r in rows(workdir)][stopped] == stopped + 1  # no step repeated or lost
  assert_matches_reference(workdir, reference)


@pytest.mark.slow
def test_sigterm_on_a_checkpoint_step_does_not_save_twice(tiny_model, tmp_path, monkeypatch):
  """SIGTERM noticed right after the regular checkpoint of the same step (3): that checkpoint
  stands, no second save of step 3 is attempted (orbax would refuse it), and Preempted is raised."""
  from jaxft.train import loop
  from reliability_runs import load_config
  workdir = tmp_path / "run"

  class SigtermAtStep3(loop._SigtermFlag):
    raised = property(lambda self: last_train_step(workdir) >= 3, lambda self, value: None)

  monkeypatch.setattr(loop, "_SigtermFlag", SigtermAtStep3)
  config = load_config(tiny_model, train__num_steps=6)
  with pytest.raises(loop.Preempted, match="saved a checkpoint at step 3"):
    loop.train_and_evaluate(config, workdir)
  assert sorted(p.name for p in (workdir / "checkpoints/latest").iterdir()) == ["3"]
