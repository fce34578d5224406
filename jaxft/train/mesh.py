"""Device mesh, sharding rules, and jitting the step once with donation and explicit shardings.

The mesh has two axes: "data" (batch split) and "fsdp" (batch split too, and parameters plus
optimizer state sharded along their largest divisible dimension, ZeRO-3 style). With fsdp = 1
parameters are replicated and this is plain data parallelism. The same code runs on 1 CPU, 8 GPUs
or a multi-host TPU slice: the global batch is laid out over every device of the mesh.

Several processes: the mesh lists each process's devices together, in process order, so process p
holds a consecutive block of batch shards; the data pipeline builds only those rows
(jaxft.data.batching.process_shards) and put_batch joins every process's rows into one global
array. Values every process needs whole (eval logits, labels) come back with gather_to_host.
"""

from __future__ import annotations

import functools

import numpy as np
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxft.data import batching

BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A (data, fsdp) mesh over `devices` (default: every device of the job, each process's
  together, which is what lets a process feed one consecutive block of batch rows)."""
  if devices is None:
    devices = sorted(jax.devices(), key=lambda d: d.process_index)  # stable sort
  devices = list(devices)
  n = len(devices)
  fsdp = int(mesh_cfg.fsdp)
  data = int(mesh_cfg.data)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} does not divide the {n} available devices; pick a "
                     f"divisor of {n}")
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp} devices, but {n} are "
                     "available; set mesh.data=-1 to use all of them")
  return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def num_batch_shards(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def param_spec(shape, fsdp: int) -> P:
  """Shards the largest dimension divisible by fsdp over "fsdp"; small or odd leaves replicate."""
  if fsdp <= 1 or not shape or int(np.prod(shape)) < 2 ** 14:
    return P()
  dims = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in dims:
    if shape[d] % fsdp == 0:
      spec = [None] * len(shape)
      spec[d] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, state_shapes):
  """A sharding for every leaf of a (shape-only) state pytree."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree_util.tree_map(
      lambda x: NamedSharding(mesh, param_spec(getattr(x, "shape", ()), fsdp)), state_shapes)


def check_batch_divides(batch_size: int, mesh: Mesh, what: str = "train.batch_size") -> None:
  n = num_batch_shards(mesh)
  if batch_size % n:
    raise ValueError(f"{what}={batch_size} does not divide over the {n} devices of the mesh "
                     f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); use a multiple "
                     f"of {n}, e.g. {max(n, batch_size // n * n)}")


def process_shards(mesh: Mesh) -> tuple[int, ...]:
  """Positions, along the flattened batch axes, of the batch shards this process's devices hold."""
  me = jax.process_index()
  return tuple(k for k, d in enumerate(mesh.devices.flat) if d.process_index == me)


@functools.lru_cache(maxsize=16)
def _checked_process_shards(mesh: Mesh) -> tuple[int, ...]:
  shards = process_shards(mesh)
  n = num_batch_shards(mesh)
  expected = batching.process_shards(n, jax.process_index(), jax.process_count())
  if shards != expected:
    raise ValueError(f"process {jax.process_index()} holds batch shards {list(shards)} of the "
                     f"mesh, but the data pipeline builds the rows of shards {list(expected)}: "
                     "list each process's devices together, in process order (make_mesh does "
                     "so by default)")
  return shards


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Host numpy batch -> global arrays laid out over the batch axes.

  One process: `batch` is the whole global batch [B, ...]. Several: it is this process's rows
  [B * L / N, ...] (its L of the N batch shards, as the data pipeline builds them), and the
  result is the global [B, ...] array every process's rows make up."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  shards, n = _checked_process_shards(mesh), num_batch_shards(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(
        sharding, x, (x.shape[0] * n // len(shards),) + x.shape[1:])

  return jax.tree_util.tree_map(put, batch)


def gather_to_host(tree):
  """Global arrays -> numpy with every row on every process (an all-gather across processes in
  a multi-process job, whatever the arrays' sharding; a plain device_get on one process)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def shard_state(state, mesh: Mesh):
  shardings = state_shardings(mesh, state)
  return jax.device_put(state, shardings), shardings


def jit_step(step_fn, mesh: Mesh, state_shardings_tree):
  """jit(step) with the state donated, batch over the batch axes, rng replicated, metrics replicated."""
  replicated = NamedSharding(mesh, P())
  return jax.jit(step_fn,
                 in_shardings=(state_shardings_tree, batch_sharding(mesh), replicated),
                 out_shardings=(state_shardings_tree, replicated),
                 donate_argnums=(0,))
