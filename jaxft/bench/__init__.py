"""Benchmarks that ship with the package: `jaxft bench` (throughput.py: the jaxft train step
against Hugging Face PyTorch) and the config they build steps from (config.py). The scripts in
benchmarks/ of a source checkout wrap these or sit beside them."""
