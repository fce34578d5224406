"""Multi-host start-up: join the processes of one job with jax.distributed.initialize().

On a single process nothing happens, so the same `jaxft train` command runs on a laptop, one GPU
box, or every worker of a TPU pod slice. A job is multi-process when the environment says so:

  - GPU clusters (or any explicit setup): JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N,
    JAX_PROCESS_ID=i (0 <= i < N), optionally JAX_LOCAL_DEVICE_IDS=0,1,... . N = 1 is a no-op.
  - TPU pod slices: JAXFT_MULTIHOST=1 (what tpu/tpu.py launch sets) or TPU_WORKER_HOSTNAMES naming
    more than one host; JAX then reads the slice's topology from the TPU VM metadata itself.
  - SLURM: SLURM_JOB_ID with SLURM_NTASKS > 1; JAX auto-detects the coordinator from SLURM's env.
JAXFT_MULTIHOST=0 turns the detection off.

Call `initialize()` before anything touches a JAX device (jax.devices(), the first jnp array):
JAX refuses to join a job after its backend started. Afterwards jax.devices() lists every chip of
the job, jaxft.train.mesh.make_mesh builds one global mesh over them, each process builds only its
rows of every batch (jaxft.data.pipeline.local_shards), and put_batch assembles them into global
arrays (jax.make_array_from_process_local_data). Process 0 alone writes metrics.jsonl,
results.json and the checkpoints' JSON; every process writes its own array chunks.

CPU works too, e.g. 2 processes with 2 virtual devices each on one machine (what
tests/train/test_multihost.py runs): XLA_FLAGS=--xla_force_host_platform_device_count=2 and the
three JAX_* variables above with a free localhost port. JAX carries the cross-process collectives
over TCP with gloo, the default of jax_cpu_collectives_implementation (env
JAX_CPU_COLLECTIVES_IMPLEMENTATION; "mpi" is the other choice).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Mapping

log = logging.getLogger("jaxft")


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process starts: `how` is "single" (no-op), "explicit" (coordinator from env) or
  "auto" (TPU pod / SLURM: JAX detects the cluster); kwargs go to jax.distributed.initialize."""

  how: str
  kwargs: dict = dataclasses.field(default_factory=dict)


def _int_env(env: Mapping[str, str], name: str) -> int:
  raw = env.get(name, "")
  try:
    return int(raw)
  except ValueError:
    raise ValueError(f"{name}={raw!r} must be an integer; a multi-process GPU job sets "
                     "JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i "
                     "(0 <= i < N) on every process") from None


def plan(env: Mapping[str, str] | None = None) -> Launch:
  """Reads the environment (module docstring) and decides how to start; raises on a half-set
  or inconsistent coordinator setup, naming the variable to fix."""
  env = os.environ if env is None else env
  flag = env.get("JAXFT_MULTIHOST", "").strip().lower()
  if flag in ("0", "false", "no"):
    return Launch("single")
  if env.get("JAX_COORDINATOR_ADDRESS"):
    missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(k)]
    if missing:
      raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} "
                       f"{'is' if len(missing) == 1 else 'are'} not; set all three on every process")
    n, i = _int_env(env, "JAX_NUM_PROCESSES"), _int_env(env, "JAX_PROCESS_ID")
    if n < 1 or not 0 <= i < n:
      raise ValueError(f"JAX_PROCESS_ID={i} must lie in [0, JAX_NUM_PROCESSES={n}) and "
                       "JAX_NUM_PROCESSES must be >= 1")
    if n == 1:
      return Launch("single")
    kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=n, process_id=i)
    if env.get("JAX_LOCAL_DEVICE_IDS"):
      kwargs["local_device_ids"] = [int(x) for x in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
    return Launch("explicit", kwargs)
  if flag in ("1", "true", "yes", "auto"):
    return Launch("auto")
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    return Launch("auto")
  if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return Launch("auto")
  return Launch("single")


def initialize(env: Mapping[str, str] | None = None) -> Launch:
  """Joins the multi-process job the environment describes; a no-op on one process.

  Idempotent: a second call in the same process does nothing. Returns the `Launch` it acted on.
  """
  launch = plan(env)
  if launch.how == "single":
    return launch
  import jax
  from jax._src import distributed as _dist  # the only way to ask "already joined?"
  if getattr(_dist.global_state, "client", None) is not None:
    return launch
  jax.distributed.initialize(**launch.kwargs)
  log.info("joined a %s multi-process job: process %d of %d, %d local / %d global devices",
           launch.how, jax.process_index(), jax.process_count(), jax.local_device_count(),
           jax.device_count())
  return launch
