"""Scale: the same step on 1 device and on an 8-device CPU mesh (data / fsdp), one compile per
bucket shape, the batch-divisibility error, and multi-process start-up (jaxft.train.distributed)."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from transformers import BertConfig

from jaxft.data.tasks import TaskInfo
from jaxft.models import init_random
from jaxft.objectives import registry
from jaxft.objectives.base import make_step
from jaxft.train import distributed
from jaxft.train import mesh as mesh_lib
from jaxft.train.optim import make_optimizer
from jaxft.core.state import TrainState, flatten

INFO = TaskInfo(name="t", kind="classification", label_names=("a", "b", "c"), num_labels=3,
                metric_names=("accuracy",), main_metric="accuracy")
TRAIN = SimpleNamespace(learning_rate=1e-3, warmup_ratio=0.0, schedule="constant", restarts=1,
                        grad_clip=1.0, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,
                        weight_decay=0.01, layer_decay=1.0, head_learning_rate=0.0)


class Opts(dict):
  __getattr__ = dict.__getitem__


@pytest.fixture(scope="module")
def model():
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")
  # vocab 1024 x hidden 32 = 32768 entries: large enough that fsdp shards the embedding table.
  cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                   vocab_size=1024, max_position_embeddings=32)
  return init_random(cfg, head="sequence_classification", num_labels=3, seed=0)


def build(model, mesh):
  """The training path: registry objective -> make_step -> mesh.jit_step, with a trace counter."""
  objective = registry.build(Opts(name="supervised", supervised=Opts(label_smoothing=0.0)), INFO)
  trainable = flatten(model.params)
  tx, schedule = make_optimizer(TRAIN, trainable, 1, 10)
  state = TrainState.create(jax.tree_util.tree_map(lambda x: x.copy(), trainable), {}, tx)
  state, shardings = mesh_lib.shard_state(state, mesh)
  traces = [0]
  step = make_step(model.apply, objective.terms, tx, lr_schedule=schedule)

  def counted(state, batch, rng):
    traces[0] += 1  # runs only while tracing
    return step(state, batch, rng)

  return mesh_lib.jit_step(counted, mesh, shardings), state, traces


def batch_of(seed, b=8, s=16):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(4, s + 1, b)
  mask = (np.arange(s)[None] < lengths[:, None]).astype(np.int32)
  return {"input_ids": (rng.integers(1, 1024, (b, s)) * mask).astype(np.int32),
          "attention_mask": mask, "token_type_ids": np.zeros((b, s), np.int32),
          "labels": rng.integers(0, 3, b).astype(np.int32), "example_mask": np.ones(b, np.float32)}


def run(model, mesh, steps=5):
  """5 steps on one fixed batch (dropout on: the rng is folded with the step) -> losses, state."""
  step, state, traces = build(model, mesh)
  batch = mesh_lib.put_batch(batch_of(0), mesh)
  losses = []
  for _ in range(steps):
    state, m = step(state, batch, jax.random.key(0))
    losses.append(float(m["loss"]))
  return {"losses": np.array(losses), "params": jax.device_get(state.trainable), "state": state,
          "step": step, "traces": traces}


@pytest.fixture(scope="module")
def reference(model):
  return run(model, mesh_lib.make_mesh(SimpleNamespace(data=1, fsdp=1), jax.devices()[:1]))


@pytest.fixture(scope="module")
def runs(model):
  return {}


@pytest.mark.parametrize("data,fsdp", [(8, 1), (4, 2)])
def test_same_losses_as_one_device(model, reference, runs, data, fsdp):
  mesh = mesh_lib.make_mesh(SimpleNamespace(data=data, fsdp=fsdp))
  assert mesh.devices.size == 8
  r = runs[(data, fsdp)] = run(model, mesh)
  assert r["traces"][0] == 1
  ref = reference["losses"]
  assert ref[-1] < ref[0] - 0.01  # it trains
  np.testing.assert_allclose(r["losses"], ref, rtol=2e-5, atol=2e-6)
  for k, v in reference["params"].items():
    np.testing.assert_allclose(r["params"][k], v, rtol=1e-4, atol=2e-6, err_msg=k)
  emb = "backbone/embeddings/word_embeddings/embedding"
  state = r["state"]
  spec = state.trainable[emb].sharding.spec
  if fsdp > 1:  # the table and its Adam moments are split over "fsdp", not replicated
    assert spec == mesh_lib.P("fsdp", None)
    assert state.opt_state[1][0].mu[emb].sharding.spec == mesh_lib.P("fsdp", None)
    assert state.trainable[emb].addressable_shards[0].data.shape == (512, 32)
  else:
    assert spec == mesh_lib.P()


def test_compiles_once_per_bucket_shape(runs):
  """The data=8 step from above (traced once for [8, 16]) over buckets 8 and 16: one more trace."""
  if (8, 1) not in runs:
    pytest.skip("runs after test_same_losses_as_one_device[8-1]")
  r = runs[(8, 1)]
  mesh = mesh_lib.make_mesh(SimpleNamespace(data=8, fsdp=1))
  state = r["state"]
  for i, s in enumerate([8, 16, 8, 16]):
    state, m = r["step"](state, mesh_lib.put_batch(batch_of(i, s=s), mesh), jax.random.key(0))
  jax.block_until_ready(m)
  assert r["traces"][0] == 2
  assert np.isfinite(float(m["loss"]))


def test_batch_that_does_not_divide_fails_clearly():
  mesh = mesh_lib.make_mesh(SimpleNamespace(data=4, fsdp=2))
  mesh_lib.check_batch_divides(16, mesh)
  with pytest.raises(ValueError, match=r"train.batch_size=12 does not divide over the 8 devices "
                     r"of the mesh \(data=4 x fsdp=2\); use a multiple of 8, e.g. 8"):
    mesh_lib.check_batch_divides(12, mesh)


# ------------------------------------------------------------------------------------------------
# Multi-process start-up


def test_plan_reads_the_environment():
  assert distributed.plan({}) == distributed.Launch("single")
  gpu = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
  assert distributed.plan(gpu) == distributed.Launch(
      "explicit", {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2})
  assert distributed.plan({**gpu, "JAX_LOCAL_DEVICE_IDS": "0,1"}).kwargs["local_device_ids"] == [0, 1]
  assert distributed.plan({**gpu, "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}).how == "single"
  assert distributed.plan({**gpu, "JAXFT_MULTIHOST": "0"}).how == "single"
  assert distributed.plan({"JAXFT_MULTIHOST": "1"}) == distributed.Launch("auto")
  assert distributed.plan({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}).how == "auto"
  assert distributed.plan({"TPU_WORKER_HOSTNAMES": "localhost"}).how == "single"
  assert distributed.plan({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}).how == "auto"
  assert distributed.plan({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}).how == "single"
  with pytest.raises(ValueError, match="JAX_PROCESS_ID is not"):
    distributed.plan({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=2 must lie in \[0, JAX_NUM_PROCESSES=2\)"):
    distributed.plan({**gpu, "JAX_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='four' must be an integer"):
    distributed.plan({**gpu, "JAX_NUM_PROCESSES": "four"})


def test_initialize_is_a_noop_on_one_process():
  assert distributed.initialize({}).how == "single"
  assert jax.process_count() == 1


_WORKER = textwrap.dedent("""
    import json
    import numpy as np
    from types import SimpleNamespace
    from jaxft.train import distributed, mesh as mesh_lib
    launch = distributed.initialize()
    import jax, jax.numpy as jnp
    mesh = mesh_lib.make_mesh(SimpleNamespace(data=-1, fsdp=1))
    pid = jax.process_index()
    local = {"x": np.arange(4, dtype=np.float32).reshape(2, 2) + 10 * pid}  # this host's rows
    g = mesh_lib.put_batch(local, mesh)
    total = jax.jit(lambda b: jnp.sum(b["x"]),
                    out_shardings=mesh_lib.NamedSharding(mesh, mesh_lib.P()))(g)
    print("RESULT " + json.dumps({"how": launch.how, "pid": pid, "n": jax.process_count(),
                                  "devices": jax.device_count(), "shape": list(g["x"].shape),
                                  "sum": float(total)}))
""")


def test_two_processes_form_one_job_with_a_global_batch():
  """Two real processes (2 CPU devices each) join through JAX_COORDINATOR_ADDRESS; each feeds its
  2 rows, the jitted sum sees the 4-row global batch: (0+1+2+3) + (10+11+12+13) = 52."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = []
  for pid in range(2):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": str(pid)}
    procs.append(subprocess.Popen([sys.executable, "-c", _WORKER], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE))
  results = []
  for p in procs:
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, err[-2000:]
    results.append(json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][7:]))
  for pid, r in enumerate(results):
    assert r == {"how": "explicit", "pid": pid, "n": 2, "devices": 4, "shape": [4, 2], "sum": 52.0}
