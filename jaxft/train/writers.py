"""Where metrics go: metrics.jsonl (one JSON object per event), TensorBoard events, a progress bar.

TensorBoard files are written with tensorboardX (no TensorFlow dependency). Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time

import jax
import numpy as np


def _plain(v):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


class MetricWriter:

  def __init__(self, workdir: str | pathlib.Path, tensorboard: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if self.enabled:
      self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

  def write(self, kind: str, step: int, metrics: dict) -> None:
    """kind: "train" / "eval" / "info"; metrics: flat name -> scalar."""
    if not self.enabled:
      return
    row = {"kind": kind, "step": int(step), "time": time.time()}
    row.update({k: _plain(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(row, allow_nan=True) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k in ("kind", "step", "time") or not isinstance(v, (int, float)) or isinstance(v, bool):
          continue
        name = k if k.startswith(("eval/", "train/")) else f"{kind}/{k}"
        if math.isfinite(v):
          self._tb.add_scalar(name, v, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
  rows = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if line:
        rows.append(json.loads(line))
  return rows


class Progress:
  """A one-line progress display with loss and speed (tqdm when on a terminal, else periodic lines)."""

  def __init__(self, total: int, initial: int = 0, enabled: bool = True):
    self.enabled = enabled and jax.process_index() == 0
    self._bar = None
    if self.enabled and sys.stderr.isatty():
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step")
    self.total = total

  def update(self, step: int, metrics: dict | None = None, n: int = 1) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.update(n)
      if metrics:
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
    elif metrics:
      text = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
      print(f"step {step}/{self.total} {text}", file=sys.stderr, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
