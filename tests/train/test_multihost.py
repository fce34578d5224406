"""Multi-host without a pod: `jaxft train` as 2 local processes (jax.distributed on CPU, gloo
collectives, 2 virtual devices each) against 1 process with 4 devices.

Both runs compile the same SPMD program for the same 4-device mesh and see the same global
batches; only who builds which rows and how the collectives travel (in-process vs gloo over TCP)
differ. Each process builds only the batch rows of its own devices (jaxft.data.batching shards),
and only process 0 writes metrics.jsonl, results.json and checkpoint metadata.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxft.data import batching, tokenize

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = 6
# STS-B (regression): Pearson / Spearman over the eval rows move with every logit, so a row out of
# order or a padding row let through shows up in the eval numbers, as it would not in an accuracy.
OVERRIDES = {
    "data.name": "stsb", "data.max_train_examples": 64, "data.max_eval_examples": 28,
    "data.max_length": 32, "data.bucket_boundaries": "32", "train.batch_size": 8, "train.eval_batch_size": 16,
    "train.num_steps": STEPS, "train.eval_every": 3, "train.checkpoint_every": 3,
    "train.progress": False, "train.log_every": 1, "train.learning_rate": 1e-3,
    "train.warmup_ratio": 0.0,
}
# The two runs add the same float32 numbers, but XLA's in-process all-reduce and gloo's over TCP
# may add them in another order: ~1 ulp (6e-8 relative) per reduction. Losses, grad norms and the
# eval MSE / Spearman then agree to 1.2e-7 relative (seen); RTOL = 2e-6 (~30 ulps) leaves room for
# that and is far below what a wrong row, mask or a batch fed twice does (the loss moves in its
# 3rd digit). Parameters agree to 6e-8 absolute (seen): PARAM_ATOL = 1e-6 is a thousandth of one
# Adam step (lr 1e-3). Pearson divides by the spread of a barely trained model's predictions,
# ~1e-3 of their size, so those ulps become up to 1e-4 of it (seen): PEARSON_RTOL = 1e-3.
RTOL, PARAM_ATOL, PEARSON_RTOL = 2e-6, 1e-6, 1e-3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir, model_dir, data_dir, log_path, devices: int, **job) -> subprocess.Popen:
  """`python -m jaxft train` on `devices` virtual CPU devices; `job`: the JAX_* variables of a
  multi-process job (jaxft.train.distributed), none for a single process."""
  argv = [sys.executable, "-m", "jaxft", "train", "--config", "experiments/quickstart.py:smoke",
          "--workdir", str(workdir), f"--config.model.name={model_dir}",
          f"--config.data.data_dir={data_dir}",
          *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
             JAXFT_MULTIHOST="" if job else "0", **job)  # "0": no SLURM / TPU auto-detection
  with open(log_path, "w") as log:
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_all(procs: dict, timeout: float) -> None:
  """Waits for every process of {name: (Popen, log path)}. Fails, with the logs, at the first
  non-zero exit (its partner would wait in a collective until JAX's own timeout) or at `timeout`;
  kills what still runs."""
  deadline = time.time() + timeout
  try:
    while True:
      codes = {name: proc.poll() for name, (proc, _) in procs.items()}
      if all(c == 0 for c in codes.values()):
        return
      failed = [f"{name} exited {c}" for name, c in codes.items() if c not in (None, 0)]
      if failed or time.time() > deadline:
        logs = "\n".join(f"--- {name}\n{log.read_text()[-3000:]}"
                         for name, (_, log) in procs.items())
        raise AssertionError(f"{'; '.join(failed) or f'not done after {timeout} s'}:\n{logs}")
      time.sleep(0.2)
  finally:
    for proc, _ in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def _rows(workdir, kind):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _checkpoint(workdir, step):
  """(state as numpy, meta) of a saved step; numpy because the 2-process run's devices (ids 0, 1,
  2048, 2049) are not this process's."""
  import jax
  import orbax.checkpoint as ocp
  root = pathlib.Path(workdir).absolute() / "checkpoints" / "latest" / str(step)
  reader = ocp.PyTreeCheckpointer()
  tree = reader.metadata(root / "state").item_metadata.tree
  as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = reader.restore(root / "state", restore_args=as_numpy)
  return state, json.loads((root / "meta" / "metadata").read_text())


@pytest.fixture(scope="module")
def runs(tiny_bert_dir, shared_data, tmp_path_factory):
  """(one-process workdir, two-process workdir): the three processes run at once."""
  root = tmp_path_factory.mktemp("multihost")
  one, two = root / "one", root / "two"
  address = f"localhost:{_free_port()}"
  glue = shared_data / "glue"
  procs = {"1x4": (_start(one, tiny_bert_dir, glue, root / "one.log", 4), root / "one.log")}
  for i in range(2):
    log = root / f"two-{i}.log"
    procs[f"2x2 process {i}"] = (_start(two, tiny_bert_dir, glue, log, 2,
                                        JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                                        JAX_PROCESS_ID=str(i)), log)
  _wait_all(procs, timeout=240)
  return one, two


@pytest.mark.slow
def test_two_processes_train_and_evaluate_like_one(runs):
  one, two = runs
  train1, train2 = _rows(one, "train"), _rows(two, "train")
  # one row per step: a second writer would double them
  assert [r["step"] for r in train1] == [r["step"] for r in train2] == list(range(1, STEPS + 1))
  for key in ("loss", "grad_norm"):
    a, b = np.array([r[key] for r in train1]), np.array([r[key] for r in train2])
    np.testing.assert_allclose(b, a, rtol=RTOL, err_msg=key)
  # eval over every example, the last batch padded (28 = 16 + 12): the processes' rows and masks
  # are gathered before scoring
  eval1, eval2 = _rows(one, "eval"), _rows(two, "eval")
  assert [r["step"] for r in eval1] == [r["step"] for r in eval2] == [3, 6]
  for r1, r2 in zip(eval1, eval2):
    assert {k for k in r1 if k.startswith("eval/")} == {"eval/mse", "eval/pearson", "eval/spearman"}
    for k in ("eval/mse", "eval/spearman"):
      np.testing.assert_allclose(r2[k], r1[k], rtol=RTOL, err_msg=k)
    np.testing.assert_allclose(r2["eval/pearson"], r1["eval/pearson"], rtol=PEARSON_RTOL)
  res1 = json.loads((one / "results.json").read_text())
  res2 = json.loads((two / "results.json").read_text())
  assert res2["device"] == res1["device"] == "4 x cpu"
  assert res2["eval"].keys() == res1["eval"].keys() and res2["best_step"] == res1["best_step"]


@pytest.mark.slow
def test_two_processes_save_the_same_checkpoint(runs):
  one, two = runs
  state1, meta1 = _checkpoint(one, STEPS)
  state2, meta2 = _checkpoint(two, STEPS)
  assert meta1["data"] == meta2["data"] and meta1["step"] == meta2["step"] == STEPS
  assert meta1["best_step"] == meta2["best_step"]
  assert state1["trainable"].keys() == state2["trainable"].keys()
  for k, v in state1["trainable"].items():
    np.testing.assert_allclose(state2["trainable"][k], v, rtol=0, atol=PARAM_ATOL, err_msg=k)


def _encoded(n: int, seed: int) -> tokenize.Encoded:
  """n random classification rows of 3..29 tokens."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, 30, n)
  return tokenize.Encoded(
      input_ids=rng.integers(5, 100, lengths.sum()).astype(np.int32),
      token_type_ids=np.zeros(lengths.sum(), np.int32),
      offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
      truncated=np.zeros(n, bool), labels=rng.integers(0, 2, n).astype(np.int32), pad_id=0,
      kind="classification")


def _assert_side_by_side_is(local_batches, global_batch):
  for k, v in global_batch.items():
    assert all(len(b[k]) == len(v) // len(local_batches) for b in local_batches), k
    np.testing.assert_array_equal(np.concatenate([b[k] for b in local_batches]), v, err_msg=k)


def test_each_process_builds_only_its_rows_of_the_global_batch():
  """2 processes x 2 of 4 shards: each builds half the rows, together the one-process batch, at
  the bucket length of the whole batch (train with padding rows, unlabeled part, resume; eval)."""
  enc, pool = _encoded(37, 0), _encoded(50, 1)
  shards = [batching.process_shards(4, p, 2) for p in range(2)]
  assert shards == [(0, 1), (2, 3)]

  def merged(part):
    common = dict(seed=3, boundaries=(8, 16, 32), num_shards=4, shards=part)
    return batching.MergedBatcher(
        batching.TrainBatcher(enc, batch_size=8, drop_remainder=False, **common),
        batching.TrainBatcher(pool, batch_size=16, stream=1, **common))

  whole, parts = merged(None), [merged(part) for part in shards]
  parts[1] = parts[1].from_state_dict(parts[1].state_dict())  # a resume keeps the shards
  for step in range(whole.steps_per_epoch + 2):  # the last batch of an epoch has padding rows
    _assert_side_by_side_is([b.batch_at(step) for b in parts], whole.batch_at(step))
  kw = dict(batch_size=8, boundaries=(8, 16, 32), num_shards=4)
  for g, *ls in zip(batching.eval_batches(enc, **kw),
                    *(batching.eval_batches(enc, shards=part, **kw) for part in shards)):
    _assert_side_by_side_is(ls, g)
