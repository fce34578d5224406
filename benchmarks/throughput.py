"""Training throughput, jaxft against Hugging Face PyTorch: `jaxft bench` from a source checkout.

    python benchmarks/throughput.py                 # BERT-base, seq 128 x batch 64 and 512 x 16
    python benchmarks/throughput.py --tiny          # CPU smoke configuration (CI)

The code is jaxft/bench/throughput.py (so an installed jaxft has `jaxft bench`); this wrapper runs
it with the report going to benchmarks/RESULTS.md, and works in a bare checkout that is not
installed (the GPU box). Its names are re-exported for the scripts in benchmarks/diag, which load
this file with runpy.
"""

import importlib.util
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
if importlib.util.find_spec("jaxft") is None:  # a bare checkout (no pip install), e.g. the GPU box
  sys.path.insert(0, str(HERE.parent))

from jaxft.bench import throughput as _impl  # noqa: E402  (reads --tiny from sys.argv: before jax)

globals().update({k: v for k, v in vars(_impl).items() if not k.startswith("__")})

if __name__ == "__main__":
  sys.exit(_impl.main(default_out=str(HERE / "RESULTS.md"), prog="python benchmarks/throughput.py"))
