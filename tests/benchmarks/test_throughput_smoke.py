"""benchmarks/throughput.py stays working: the --tiny CPU run, and the report's arithmetic."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "throughput.py"


def _load():
  spec = importlib.util.spec_from_file_location("jaxft_bench_throughput", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


tp = _load()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, like users
  # The GPU image has no ml_collections / datasets / seqeval: the script must not need them.
  runner = ("import runpy, sys\n"
            "for m in ('ml_collections', 'datasets', 'seqeval'): sys.modules[m] = None\n"
            f"sys.argv = [{str(SCRIPT)!r}, '--tiny', '--out', {str(out / 'RESULTS.md')!r}]\n"
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n")
  proc = subprocess.run([sys.executable, "-c", runner], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return (out / "RESULTS.md").read_text(), json.loads((out / "results.json").read_text())


def test_tiny_run_reports_every_row(tiny_run):
  report, data = tiny_run
  rows = {(r["impl"], r["kind"]): r for r in data["rows"]}
  assert set(rows) == {("torch eager", "supervised"), ("jaxft", "supervised"), ("jaxft", "lora"),
                       ("jaxft", "fgm"), ("host", "bucketed")}
  for key in [("torch eager", "supervised"), ("jaxft", "supervised"), ("jaxft", "lora"),
              ("jaxft", "fgm")]:
    r = rows[key]
    assert (r["seq"], r["batch"]) == (16, 8)
    assert r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(16 * 8 / r["step_s"])
    assert math.isfinite(r["loss"]) and 0.0 < r["loss"] < 5.0  # ~ln 2 for 2 random labels
    table_row = f"| 16x8 | {key[0]} | {key[1]} | {r['step_s'] * 1e3:.2f} | {r['tokens_per_s']:,.0f} |"
    assert table_row in report
  sup = rows[("jaxft", "supervised")]
  assert sup["traces"] == 1 and sup["vs_supervised"] == 1.0
  assert rows[("jaxft", "fgm")]["vs_supervised"] == pytest.approx(
      rows[("jaxft", "fgm")]["step_s"] / sup["step_s"])
  # Full fine-tuning holds more optimizer state than LoRA (compiled memory analysis on CPU).
  assert 0 < rows[("jaxft", "lora")]["peak_bytes"] < sup["peak_bytes"]
  peak = data["meta"]["peak_flops"]
  assert peak > 0 and sup["mfu"] == pytest.approx(
      tp.train_flops(tp.bert_config(tp.resolve(tp.build_parser().parse_args(["--tiny"]))), 16, 8)
      / sup["step_s"] / peak)
  host = rows[("host", "bucketed")]
  assert host["traces"] == len(host["buckets"]) >= 2  # compiled exactly once per bucket shape
  assert 0.0 < host["padding"] < 1.0 and host["host_s"] > 0
  assert "CPU run: a smoke test" in report and "| target | required | measured | status |" in report
  assert data["meta"]["device"].startswith("cpu")


def test_train_flops_counts_the_encoder_matmuls():
  """3 x (2 x encoder kernel params x tokens + attention 4 S H per token per layer + head)."""
  import jax
  from jaxft.core.state import flatten
  args = tp.resolve(tp.build_parser().parse_args(["--tiny"]))
  cfg = tp.bert_config(args)
  model = tp.jax_model(cfg, args, {})
  flat = flatten(model.params)
  enc = sum(v.size for k, v in flat.items() if "/encoder/" in k and k.endswith("/kernel"))
  head = sum(v.size for k, v in flat.items() if k.endswith("/kernel") and "/encoder/" not in k)
  s, b, h, n_layers = 16, 8, cfg.hidden_size, cfg.num_hidden_layers
  expected = 3 * b * (2 * enc * s + 4 * s * s * h * n_layers + 2 * head)
  assert tp.train_flops(cfg, s, b) == expected
  assert jax.tree_util.tree_leaves(model.params)  # the model really exists


def _row(impl, kind, step_s, seq=128, batch=64, **kw):
  return {"impl": impl, "kind": kind, "step_s": step_s, "seq": seq, "batch": batch, **kw}


def test_targets_decide_pass_and_fail_from_the_rows():
  from transformers import BertConfig
  rows = [_row("torch compile", "supervised", 0.30), _row("jaxft", "supervised", 0.12, peak_bytes=10),
          _row("jaxft", "lora", 0.10, peak_bytes=5),
          _row("host", "bucketed", 0.10, host_s=0.02, padding=0.3, buckets=[[64, 128]], traces=1),
          _row("torch compile", "supervised", 0.2, seq=512, batch=16),
          _row("jaxft", "supervised", 0.1, seq=512, batch=16)]
  cfg = BertConfig()
  peak = tp.train_flops(cfg, 128, 64) / 0.12 / 0.5  # makes the 128x64 MFU exactly 50%
  tp.derive(rows, peak, cfg)
  assert rows[1]["vs_compile"] == pytest.approx(2.5) and rows[1]["mfu"] == pytest.approx(0.5)
  assert rows[2]["vs_supervised"] == pytest.approx(0.10 / 0.12)
  got = {name: (measured, status) for name, _, measured, status in tp.targets(rows)}
  assert got["supervised vs torch.compile, seq 128 x batch 64"] == ("2.50x", "PASS")
  assert got["supervised MFU, seq 128 x batch 64"] == ("50.0%", "PASS")
  assert got["supervised vs torch.compile, seq 512 x batch 16"] == ("2.00x", "FAIL")
  assert got["LoRA speed vs full FT, 128x64"] == ("1.20x", "FAIL")
  assert got["LoRA peak memory vs full FT, 128x64"] == ("0.50x", "PASS")
  assert got["host time per batch / step time, 128x64"] == ("20.0%", "FAIL")
  assert got["LoRA speed vs full FT, 512x16"] == ("-", "n/a")


def test_objective_options_without_ml_collections():
  cfg = tp.objective_config("pgd", steps=3)
  assert cfg.name == "pgd" and cfg.pgd.steps == 3 and "epsilon" in cfg.pgd
  with pytest.raises(KeyError, match="has no options"):
    tp.objective_config("fgm", stepz=2)
  with pytest.raises(ValueError, match="SEQxBATCH"):
    tp.parse_shapes("128-64")
  assert tp.parse_shapes("128x64,512x16") == [(128, 64), (512, 16)]
