"""Fixtures of the reliability tests: a tiny random BERT, one shared uninterrupted reference run."""

from __future__ import annotations

import pathlib

import pytest

from reliability_runs import NUM_STEPS, last_train_step, run, train_argv


@pytest.fixture(scope="session")
def tiny_model(tiny_bert_dir) -> pathlib.Path:
  """The shared tiny random BERT (tests/conftest.py)."""
  return tiny_bert_dir


@pytest.fixture(scope="session")
def reference(tiny_model, tmp_path_factory) -> pathlib.Path:
  """One uninterrupted run of the shared tiny config (its workdir)."""
  root = tmp_path_factory.mktemp("reference")
  workdir = root / "run"
  run(train_argv(workdir, tiny_model), root / "log.txt")
  assert last_train_step(workdir) == NUM_STEPS
  return workdir


@pytest.fixture
def no_compile(monkeypatch):
  """Fails the test if anything gets as far as jitting the train step."""
  from jaxft.train import mesh

  def refuse(*a, **k):
    raise AssertionError("bad input reached the jit of the train step")

  monkeypatch.setattr(mesh, "jit_step", refuse)

