"""benchmarks/step_cost.py reads the compiled train step (XLA cost analysis, HLO census) of jaxft
and of the hand-written reference; profile_summary.py summarises a profiler trace; both run on a
GPU image without ml_collections."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def bench(name: str):
  """benchmarks/<name>.py as a module (the scripts are not a package)."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
  """The tiny steps (2 layers x 64, seq 16 x batch 4) of jaxft and the reference, supervised and
  LoRA, measured through the CLI's --rows / --jsonl path; keyed (impl, kind)."""
  out = tmp_path_factory.mktemp("step_cost") / "rows.jsonl"
  sc = bench("step_cost")
  sc.main(["--tiny", "--seq", "16", "--batch", "4", "--jsonl", str(out), "--rows",
           "jaxft:supervised,reference:supervised,jaxft:lora,reference:lora"])
  got = [json.loads(x) for x in out.read_text().splitlines()]
  return {(r["impl"], r["kind"]): r for r in got}


def test_every_row_reports_positive_costs(rows):
  assert len(rows) == 4
  for r in rows.values():
    assert r["bytes_accessed"] > 0 and r["flops"] > 0 and r["ops"] > 0, r
    assert isinstance(r["has_conditional"], bool)
    assert r["census"]["dot"] > 0 and r["temp_bytes"] > 0


def test_lora_does_less_work_than_full_fine_tuning(rows):
  for impl in ("jaxft", "reference"):
    full, lora = rows[impl, "supervised"], rows[impl, "lora"]
    # No weight gradients of the frozen kernels; no Adam update of frozen leaves.
    assert lora["flops"] < full["flops"] and lora["bytes_accessed"] < full["bytes_accessed"]
    assert lora["argument_bytes"] < full["argument_bytes"] / 2  # no moments for frozen weights


def test_jaxft_step_does_the_reference_work_without_a_conditional(rows):
  ref, ours = rows["reference", "supervised"], rows["jaxft", "supervised"]
  assert ref["has_conditional"] is False
  # The step skips non-finite updates with selects, not lax.cond (a device->host sync on GPU).
  assert ours["has_conditional"] is False
  # The same matmuls, forward and backward; the other flops (elementwise, optimizer) are close.
  assert ours["census"]["dot"] == ref["census"]["dot"]
  assert 0.98 < ours["flops"] / ref["flops"] < 1.1
  # Only the word embedding is gathered/scattered: token types are selects, positions a slice.
  assert ours["census"].get("scatter", 0) == 1 and ours["census"].get("gather", 0) == 1


def test_table_gives_ratios_against_the_reference(rows):
  text = bench("step_cost").table(list(rows.values()))
  line = next(x for x in text.splitlines() if x.startswith("| jaxft supervised |"))
  ref, ours = rows["reference", "supervised"], rows["jaxft", "supervised"]
  assert f"{ours['ops'] / ref['ops']:.3f}x" in line


def test_hlo_census_counts_entry_ops_and_conditional_branches():
  import jax
  import jax.numpy as jnp
  sc = bench("step_cost")

  def f(x, p):
    y = jnp.tanh(x) @ x
    return jax.lax.cond(p, lambda: jnp.sin(y) * 2.0, lambda: y)

  row, text = sc.cost_of(lambda x, p, unused: f(x, p), jnp.ones((8, 8)), jnp.asarray(True),
                         jnp.zeros(()))
  census = sc.hlo_opcodes(text)
  assert row["has_conditional"] is True and census["all"]["conditional"] == 1
  assert row["branch_ops"] >= 1  # the sin/multiply branch, not seen at the top level
  assert row["ops"] == sum(n for op, n in census["entry"].items() if op not in sc.SKIP_OPS)
  hand = """HloModule m

%b1 (p: f32[]) -> f32[] {
  %p = f32[] parameter(0)
  ROOT %s = f32[] sine(f32[] %p)
}

ENTRY %main (a: f32[], c: pred[]) -> (f32[], f32[]) {
  %a = f32[] parameter(0)
  %c = pred[] parameter(1)
  %k = f32[] constant(1)
  %x = f32[] add(f32[] %a, f32[] %k)
  %r = f32[] conditional(pred[] %c, f32[] %x, f32[] %x), true_computation=%b1, false_computation=%b1
  ROOT %t = (f32[], f32[]) tuple(f32[] %x, f32[] %r)
}
"""
  c = sc.hlo_opcodes(hand)
  assert dict(c["entry"]) == {"parameter": 2, "constant": 1, "add": 1, "conditional": 1, "tuple": 1}
  assert c["branch_ops"] == 1 and c["all"]["sine"] == 1


def test_runs_without_ml_collections_datasets_seqeval():
  """The GPU image lacks them: step_cost must import, read the repository's default config through
  its stand-in (benchmarks/bench_config.py), and build the jaxft step with them blocked."""
  code = r"""
import sys, json
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("ml_collections", "datasets", "seqeval"):
      raise ModuleNotFoundError(f"blocked {name}", name=name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, "benchmarks")
import step_cost
from bench_config import base_config
c = base_config()
step, state, batch, rng = step_cost.jaxft_step("lora", 8, 2, tiny=True)
print(json.dumps({"config": c.to_dict(), "trainable": len(state.trainable)}))
"""
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  from jaxft.config import base_config
  assert got["config"] == json.loads(json.dumps(base_config().to_dict()))
  assert 0 < got["trainable"] < 20  # LoRA A/B of query/value in 2 layers + the classifier


def test_profile_summary_counts_kernels_classes_and_gaps():
  ps = bench("profile_summary")
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 9, "args": {"name": "XLA Ops"}}]
  kernels = []
  t = 0.0
  for _ in range(2):  # 2 steps: a gemm, a fusion, a 50 us host gap
    kernels.append({"ph": "X", "pid": 1, "tid": 7, "name": "sm90_xmma_gemm_bf16", "ts": t, "dur": 30})
    kernels.append({"ph": "X", "pid": 1, "tid": 7, "name": "loop_add_fusion", "ts": t + 30, "dur": 10})
    t += 90
  host = [{"ph": "X", "pid": 2, "tid": 1, "name": "PjitFunction", "ts": 0, "dur": 200},
          {"ph": "X", "pid": 1, "tid": 9, "name": "fusion.3", "ts": 0, "dur": 40}]  # derived line
  s = ps.summarize({"traceEvents": meta + kernels + host}, steps=2)
  assert s["kernels_per_step"] == 2 and s["source"] == "device: /device:GPU:0"
  assert s["by_class"]["matmul"]["share"] == 0.75
  assert s["by_class"]["elementwise fusion"]["kernels_per_step"] == 1
  assert s["gap_ms_per_step"] == 0.025 and s["largest_gaps_us"] == [50.0]
  assert s["busy_fraction"] == round(80 / 130, 4)
  assert "| matmul | 1.0 |" in ps.table(s)


def test_gpu_check_rows_and_kinds_of_the_device_run_parse():
  """The device run's step-cost rows (which the CPU smoke run only partly measures) and throughput
  kinds are ones the scripts know."""
  import re
  script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
  rows = ",".join(re.findall(r'^SC_ROWS="(?:\$SC_ROWS,)?([^"]+)"', script, re.M)[:2])
  sc = bench("step_cost")
  parsed = sc.parse_rows(rows)
  assert len(parsed) == 7 and {r["reference"] for r in parsed} == {True, False}
  assert {r["variant"] for r in parsed} <= set(sc.VARIANTS)
  from jaxft.bench import throughput
  for kinds in re.findall(r"--kinds ([\w,]+)", script):
    assert set(kinds.split(",")) <= set(throughput.KINDS), kinds


@pytest.mark.slow
def test_gpu_check_tiny_mode_runs_every_stage_on_cpu(tmp_path):
  """GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh: every stage exits 0 (~60 s on 2 CPU cores)
  and leaves its files, at most 8, no folders (what a device tool carries back)."""
  import os
  env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_TINY": "1", "PYTHON": sys.executable}
  env.pop("XLA_FLAGS", None)  # conftest's 8 virtual devices are not what the script runs on
  proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-2000:]
  stages = (tmp_path / "stages.txt").read_text()
  for name in ("step_cost", "throughput_128x64", "profile_jaxft", "profile_reference"):
    assert f"{name}: rc=0" in stages, stages + (tmp_path / "gpu_check.log").read_text()[-3000:]
  files = sorted(p.name for p in tmp_path.iterdir())
  assert all((tmp_path / f).is_file() for f in files) and len(files) <= 8, files
  rows = [json.loads(x) for x in (tmp_path / "step_cost.jsonl").read_text().splitlines()]
  assert len(rows) == 2 and {r["impl"] for r in rows} == {"jaxft", "reference"}
  assert "| jaxft supervised |" in (tmp_path / "step_cost.md").read_text()
  assert "kernels/step" in (tmp_path / "profile.txt").read_text()
  assert "jaxft" in (tmp_path / "RESULTS.md").read_text()
  assert "jax" in (tmp_path / "machine.txt").read_text()
