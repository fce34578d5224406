"""JAX's persistent compilation cache under the jaxft cache: a rerun loads its compiled steps.

    from jaxft.core import compile_cache
    compile_cache.enable()            # what `jaxft train | eval | table | bench` do at start
    compile_cache.enable("/fast/x")   # another folder; enable("0") or JAXFT_COMPILE_CACHE=0: off

Where (first that applies):
  1. jax_compilation_cache_dir already set (JAX_COMPILATION_CACHE_DIR, jax.config.update): kept
     as it is, with its own thresholds; jaxft changes nothing.
  2. `setting` (an argument), else $JAXFT_COMPILE_CACHE: "0" / "off" / "false" / "no" = no cache;
     "" / "1" / "on" = the default folder; anything else is the folder.
  3. The default folder: $JAXFT_CACHE (default ~/.cache/jaxft, as jaxft.assets.cache_dir())/xla.

What is cached: every program whose compile took >= MIN_COMPILE_TIME_S (JAX's default is 1 s,
which on a 2-core CPU skips the eval forward of small buckets and the jitted helpers), of any
size (JAX's size floor off). The folder is an LRU cache of at most MAX_BYTES (JAX evicts the least
recently read entries past it) when the `filelock` package is there to guard it, unbounded
otherwise. An entry is keyed by the optimized program, the compile options (XLA_FLAGS included),
the backend and the jax / jaxlib version, so a changed model, shape or flag compiles afresh and a
hit is the very program a fresh compile would give (bitwise the same results).

The cache is trusted code: do not point it at a folder others may write to (jax's warning on
`set_cache_dir`). The GPU-only XLA caches JAX turns on with it (per-fusion autotuning) sit in
the same folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pathlib

log = logging.getLogger("jaxft")

ENV = "JAXFT_COMPILE_CACHE"
OFF = ("0", "off", "false", "no", "none")
MIN_COMPILE_TIME_S = 0.1  # cache what took >= 0.1 s to compile (see the module docstring)
MAX_BYTES = 4 * 2 ** 30


def default_dir() -> pathlib.Path:
  """$JAXFT_CACHE/xla (the layer below jaxft.assets cannot import it; tests check they agree)."""
  root = os.environ.get("JAXFT_CACHE", pathlib.Path.home() / ".cache" / "jaxft")
  return pathlib.Path(root) / "xla"


def resolve(setting: str | os.PathLike | None = None) -> pathlib.Path | None:
  """The folder `setting` (or $JAXFT_COMPILE_CACHE when None) names; None = no cache."""
  value = os.environ.get(ENV, "") if setting is None else os.fspath(setting)
  value = value.strip()
  if value.lower() in OFF:
    return None
  if value.lower() in ("", "1", "on", "true", "yes"):
    return default_dir()
  return pathlib.Path(value).expanduser()


def enable(setting: str | os.PathLike | None = None) -> pathlib.Path | None:
  """Turns the persistent cache on (module docstring); -> the folder in use, or None when off.
  Call it before the first compile; a later call keeps the folder JAX already reads."""
  import jax
  current = jax.config.jax_compilation_cache_dir
  if current:  # the user's own JAX setting wins, thresholds included
    return pathlib.Path(current)
  path = resolve(setting)
  if path is None:
    return None
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:  # a read-only home: run uncached rather than fail the run
    log.warning("compile cache off: cannot create %s (%s)", path, e)
    return None
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  if importlib.util.find_spec("filelock") is not None:
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  jax.config.update("jax_compilation_cache_dir", str(path))
  return path
