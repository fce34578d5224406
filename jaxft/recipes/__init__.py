"""Runs made of runs: a sequence or a mixture of ordinary training runs.

`run(config, workdir)` is what `jaxft train` and `jaxft table` call: it picks the recipe the config
asks for and otherwise trains one run (jaxft.train.loop.train_and_evaluate):
  multitask.tasks      one encoder, a head per task, tasks sampled step by step (multitask.py)
  continual.tasks      tasks one after another, replay and EWC against forgetting (continual.py)
  self_training.rounds Noisy Student rounds, each an ordinary run (self_training.py)
Every recipe's runs go through the same loop and step builder, so they share the NaN guard,
checkpoints and exact resume. `setup_for(config)` is the setup of one run of the config, for
`jaxft eval` / `export` of a finished workdir.
"""

from __future__ import annotations


def setup_for(config, devices=None):
  """The Setup (jaxft.train.setup) of one run of `config`: a multitask or continual run's own
  (several tasks' data and heads), else build_setup's."""
  if config.multitask.tasks:
    from jaxft.recipes import multitask
    return multitask.setup(config, devices)
  if config.continual.tasks:
    from jaxft.recipes import continual
    return continual.setup(config, devices)
  from jaxft.train.setup import build_setup
  return build_setup(config, devices)


def run(config, workdir, *, overwrite: bool = False, devices=None) -> dict:
  """Runs (or resumes) the experiment in `config` in `workdir`; returns its results dict."""
  if config.multitask.tasks:
    from jaxft.recipes import multitask
    return multitask.run(config, workdir, overwrite=overwrite, devices=devices)
  if config.continual.tasks:
    from jaxft.recipes import continual
    return continual.run(config, workdir, overwrite=overwrite, devices=devices)
  if config.self_training.rounds > 0:
    from jaxft.recipes import self_training
    return self_training.run(config, workdir, overwrite=overwrite, devices=devices)
  from jaxft.train.loop import train_and_evaluate
  return train_and_evaluate(config, workdir, overwrite=overwrite, devices=devices)
