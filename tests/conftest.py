"""Test setup: 8 virtual CPU devices (multi-device tests) and a private asset cache when asked."""

import os

# Must happen before jax is imported anywhere: lets one CPU act as an 8-device mesh.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib

import pytest

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  path = SHARED / "data"
  if not path.is_dir():
    pytest.fail(f"{path} is missing: CI and developers keep ../shared beside the checkout")
  return path


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
  from jaxft import assets
  return assets.fetch("minilm-l6")
