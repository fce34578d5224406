"""Fixtures of the harness tests: one XLA compilation cache for the real runs of these tests
(in-process and in the processes they start), so a program compiled once (the tiny BERT's
supervised step, its eval) is read back by every later run of the same shapes."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def xla_cache(tmp_path_factory):
  """A persistent compilation cache for this session's harness runs; the previous settings are
  restored afterwards, so other tests compile as they always do."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc
  path = str(tmp_path_factory.mktemp("xla_cache"))
  env = {"JAX_COMPILATION_CACHE_DIR": path, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  saved_env = {k: os.environ.get(k) for k in env}
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {n: getattr(jax.config, n) for n in names}
  os.environ.update(env)  # for `python -m jaxft ...` started by the tests
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  cc.set_cache_dir(path)
  cc.reset_cache()
  yield path
  for k, v in saved_env.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  for n, v in saved.items():
    jax.config.update(n, v)
  cc.reset_cache()
