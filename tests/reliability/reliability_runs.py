"""Helpers of the reliability tests: the tiny run's command, starting / killing it, reading results.

Runs here are `python -m jaxft train` subprocesses (so that they can be killed) on the real `mr`
task, shrunk to 64 training rows and a 2-layer, 32-wide BERT: ~15 s each, mostly JAX startup and
compile. One uninterrupted run (`reference`) is shared by every test that compares against it.
"""

from __future__ import annotations

import atexit
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
NUM_STEPS = 16
# checkpoint_every=3 and eval_every=8: saves at 3, 6, 8 (eval), 9, 12, 15, 16 (last).
RUN_OVERRIDES = {
    "data.max_train_examples": 64, "data.max_eval_examples": 32, "data.max_length": 32,
    "data.bucket_boundaries": "32", "train.batch_size": 8, "train.eval_batch_size": 8,
    "train.num_steps": NUM_STEPS, "train.checkpoint_every": 3, "train.eval_every": 8,
    "train.keep_checkpoints": 3, "train.progress": False, "train.log_every": 1,
}


def overrides(model_dir, **extra) -> list[str]:
  """--config.k=v arguments of the shared tiny run, plus `extra` (dots as double underscores)."""
  values = {"model.name": str(model_dir), **RUN_OVERRIDES,
            **{k.replace("__", "."): v for k, v in extra.items()}}
  return [f"--config.{k}={v}" for k, v in values.items()]


def train_argv(workdir, model_dir, **extra) -> list[str]:
  return ["train", "--config", "experiments/quickstart.py:smoke", "--workdir", str(workdir),
          *overrides(model_dir, **extra)]


def load_config(model_dir, **extra):
  from jaxft import config as config_lib
  return config_lib.load("experiments/quickstart.py:smoke",
                         config_lib.parse_overrides(overrides(model_dir, **extra)))


# The runs of one test session share JAX's persistent compilation cache: a command run again (the
# resumed half of a kill test) loads the executables its first run compiled instead of compiling
# them again. A loaded executable is the same program, so results stay bitwise those of a fresh
# compile (the resume tests compare exactly that).
COMPILE_CACHE = pathlib.Path(tempfile.mkdtemp(prefix="jaxft-test-jax-cache-"))
atexit.register(shutil.rmtree, COMPILE_CACHE, ignore_errors=True)
COMPILE_CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": str(COMPILE_CACHE),
                     "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                     "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def start(argv, log_path, python_code: str | None = None, env: dict | None = None
          ) -> subprocess.Popen:
  """Starts `python -m jaxft <argv>` (or `python -c python_code <argv>`), output into log_path,
  with the session's compilation cache; env: extra environment variables."""
  env = {**os.environ, **COMPILE_CACHE_ENV, **(env or {})}
  env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  env.update(JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
  head = ["-c", python_code] if python_code else ["-m", "jaxft"]
  log = open(log_path, "w")
  return subprocess.Popen([sys.executable, *head, *argv], cwd=REPO, env=env, stdout=log,
                          stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log_path, timeout=240) -> str:
  proc.wait(timeout=timeout)
  return pathlib.Path(log_path).read_text()


def run(argv, log_path, env: dict | None = None) -> str:
  """Runs to the end; fails the test with the log when the exit status is not 0."""
  proc = start(argv, log_path, env=env)
  out = finish(proc, log_path)
  assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-4000:]}"
  return out


def rows(workdir, kind="train") -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # a line being written right now
      continue
    if row["kind"] == kind:
      out.append(row)
  return out


def last_train_step(workdir) -> int:
  return max((r["step"] for r in rows(workdir)), default=0)


def wait_until(predicate, proc: subprocess.Popen, log_path, timeout=240, what="") -> None:
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}:\n"
                           f"{pathlib.Path(log_path).read_text()[-4000:]}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.002)


def losses_by_step(workdir) -> dict[int, tuple[float, float]]:
  """step -> (loss, grad_norm) of the last train row written for that step."""
  return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows(workdir)}


def saved_state(workdir, step=None, which="latest"):
  """The raw checkpointed TrainState tree (numpy) of `step` (default: the newest)."""
  import jax
  import orbax.checkpoint as ocp
  root = pathlib.Path(workdir) / "checkpoints" / which
  steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
  step = steps[-1] if step is None else step
  tree = ocp.StandardCheckpointer().restore(root / str(step) / "state")
  return step, jax.tree_util.tree_map(np.asarray, tree)


def assert_trees_bitwise_equal(a, b) -> None:
  import jax
  la, ta = jax.tree_util.tree_flatten_with_path(a)
  lb, tb = jax.tree_util.tree_flatten_with_path(b)
  assert ta == tb, "different tree structures"
  for (path, x), (_, y) in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert x.tobytes() == y.tobytes(), f"{jax.tree_util.keystr(path)} differs"
