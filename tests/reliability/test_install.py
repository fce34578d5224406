"""`pip install .` (not editable): the wheel holds every module of the source tree, and the
installed package imports and answers its command line from another directory, without the
checkout on the path. (The whole of `jaxft bench --tiny` and the quickstart from a fresh venv is
the manual check in docs/reliability.md; this one runs in CI.)"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_wheel_installs_every_module_and_runs_outside_the_checkout(tmp_path):
  pytest.importorskip("setuptools", reason="building the wheel offline needs the build backend")
  pip = [sys.executable, "-m", "pip"]
  subprocess.run([*pip, "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w",
                  str(tmp_path / "wheel")], check=True, cwd=tmp_path)
  wheel, = (tmp_path / "wheel").glob("jaxft-*.whl")
  target = tmp_path / "site"
  subprocess.run([*pip, "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                 check=True, cwd=tmp_path)
  source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "jaxft").rglob("*.py")}
  installed = {p.relative_to(target).as_posix() for p in (target / "jaxft").rglob("*.py")}
  assert source == installed, sorted(source ^ installed)

  env = {**os.environ, "PYTHONPATH": str(target)}
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  code = ("import importlib, pkgutil, jaxft\n"
          "assert jaxft.__file__.startswith(%r), jaxft.__file__\n"
          "for m in pkgutil.walk_packages(jaxft.__path__, 'jaxft.'):\n"
          "  if not m.name.endswith('__main__'):  # the command line itself, run below\n"
          "    importlib.import_module(m.name)\n" % str(target))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=outside, env=env)
  out = subprocess.run([sys.executable, "-m", "jaxft", "bench", "--help"], check=True, cwd=outside,
                       env=env, capture_output=True, text=True)
  assert "--tiny" in out.stdout
  assert "PyTorch was not found" not in out.stdout + out.stderr
