"""The run config on a machine without ml_collections (the GPU image): jaxft.config.base_config()
read through a stand-in ConfigDict, as nested attribute dicts. The benchmarks (jaxft bench,
benchmarks/step_cost.py) build their steps with jaxft.train.build.build from it, so they measure
the step `jaxft train` runs.
"""

from __future__ import annotations

import sys
import types


class AttrDict(dict):
  """A dict with attribute access: what jaxft code reads from a ConfigDict (`cfg.train.grad_clip`,
  `cfg.objective[name]`, `"k" in cfg`)."""

  def __getattr__(self, key):
    try:
      return self[key]
    except KeyError:
      raise AttributeError(key) from None

  def __setattr__(self, key, value):
    self[key] = value

  @classmethod
  def deep(cls, d):
    return cls({k: cls.deep(v) if isinstance(v, dict) else v for k, v in d.items()})

  def to_dict(self):
    return {k: v.to_dict() if isinstance(v, AttrDict) else v for k, v in self.items()}


def base_config() -> AttrDict:
  """`jaxft.config.base_config()` as nested AttrDicts. Without ml_collections it runs that very
  function against a stand-in module whose ConfigDict is AttrDict (then forgets both), so the
  defaults are the repository's on any machine."""
  try:
    import ml_collections  # noqa: F401
  except ImportError:
    saved = {k: sys.modules.pop(k) for k in ("ml_collections", "jaxft.config") if k in sys.modules}
    shim = types.ModuleType("ml_collections")
    shim.ConfigDict = AttrDict
    sys.modules["ml_collections"] = shim
    try:
      from jaxft.config import base_config as make
      return AttrDict.deep(make().to_dict())
    finally:
      for k in ("ml_collections", "jaxft.config"):
        sys.modules.pop(k, None)
      sys.modules.update(saved)
  from jaxft.config import base_config as make
  return AttrDict.deep(make().to_dict())
