"""Every kind of run resumes exactly after a SIGKILL at a random moment.

Two runs cover the kinds whose state goes beyond plain fine-tuning: FixMatch with LoRA and gradient
accumulation (2 micro-batches), and Mean Teacher with gradual magnitude pruning and an EMA of the
weights. Each is a real `python -m jaxft train` subprocess, killed once a random step in 3..12 is
logged and a checkpoint is committed; the same command then runs again. Every step's loss and grad
norm, the final checkpointed state (params, LoRA factors, optimizer, and extras: EMA, teacher,
masks, pool position, skipped-step count) and the best checkpoint equal an uninterrupted run's bit
for bit. The three runs of a kind share JAX's compilation cache, so only the first one compiles.
"""

import random
import signal

import pytest

from reliability_runs import (NUM_STEPS, last_train_step, losses_by_step, run, start, train_argv,
                              wait_until)
from test_resume import assert_matches_reference, committed_steps, resumed_from

SEMI = dict(data__labeled_per_class=8, data__unlabeled_ratio=2)
KINDS = {
    "fixmatch+lora+grad_accum": dict(objective__name="fixmatch", peft__method="lora",
                                     train__grad_accum_steps=2, train__batch_size=16, **SEMI),
    "mean_teacher+magnitude_pruning+ema": dict(
        objective__name="mean_teacher", prune__method="magnitude", prune__final_sparsity=0.5,
        prune__frequency=2, train__ema_decay=0.9, train__eval_with="ema", **SEMI),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_sigkill_at_a_random_step_resumes_bitwise(kind, tiny_model, tmp_path):
  argv = lambda workdir: train_argv(workdir, tiny_model, **KINDS[kind])
  reference = tmp_path / "reference"
  run(argv(reference), tmp_path / "reference.txt")
  assert last_train_step(reference) == NUM_STEPS

  kill_after = random.randint(3, NUM_STEPS - 4)
  workdir = tmp_path / "run"
  log_path = tmp_path / "killed.txt"
  proc = start(argv(workdir), log_path)
  wait_until(lambda: last_train_step(workdir) >= kill_after and committed_steps(workdir), proc,
             log_path, what=f"step {kill_after} and a committed checkpoint")
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = last_train_step(workdir)
  assert kill_after <= killed_at < NUM_STEPS, f"the kill after step {kill_after} came too late"
  ref = losses_by_step(reference)
  assert losses_by_step(workdir) == {s: ref[s] for s in range(1, killed_at + 1)}

  log = run(argv(workdir), tmp_path / "resumed.txt")
  assert resumed_from(log) <= killed_at, kill_after
  assert_matches_reference(workdir, reference)
