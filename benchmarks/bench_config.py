"""The run config without ml_collections: jaxft/bench/config.py, importable from benchmarks/ as
`bench_config` (benchmarks/step_cost.py and its test import it by that name)."""

import importlib.util
import pathlib
import sys

if importlib.util.find_spec("jaxft") is None:  # a bare checkout (no pip install), e.g. the GPU box
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jaxft.bench.config import AttrDict, base_config  # noqa: E402,F401
