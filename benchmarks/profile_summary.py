"""A few profiled train steps, summarised: kernels per step, device time by kernel class, host gaps.

    python benchmarks/profile_summary.py --seq 128 --batch 64 --steps 3 --out gpu_out/profile
    python benchmarks/profile_summary.py --tiny --out /tmp/prof          # CPU smoke run
    python benchmarks/profile_summary.py --trace DIR_OR_perfetto_trace.json.gz   # summarise only

The step is `step_cost.jaxft_step` (or `--reference`), jitted with donation, run `--warmup` times,
then `--steps` times under `jax.profiler.trace(..., create_perfetto_trace=True)`. The trace is the
Chrome/Perfetto JSON jax writes beside the xplane; only the standard library reads it.

Device timeline: complete events ("ph": "X") of processes whose name contains "/device:", on their
"Stream ..." threads when there are such (not the derived "XLA Ops" lines), memcpy/memset
included. Per step: kernel count = events / steps. Time by class: the kernel name matched against
CLASSES in order (first match wins). Busy = union of kernel intervals
within the traced span; host gaps = idle stretches between consecutive kernels on the device (all
streams merged), the time the GPU waits for the host (launches, syncs, Python). Without a device
timeline (CPU) the same is done over the host's events named like HLO instructions, so the tiny
mode exercises the code (nested ops of a while loop are counted inside it as well there).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CLASSES = (  # (class, regex over the lower-cased kernel name)
    ("memcpy/memset", r"memcpy|memset|copy_?d2d|h2d|d2h"),
    ("attention", r"flash|fmha|cudnn|dot_product_attention|_attn|sdpa"),
    ("matmul", r"gemm|cutlass|cublas|xmma|nvjet|wgmma|matmul|\bdot|dot[._]|convolution|ynn_fusion"),
    ("rng", r"rng|threefry|philox|random"),
    ("scatter/gather", r"scatter|gather|dynamic.update.slice|dynamic.slice"),
    ("reduction", r"reduc|norm"),
    ("elementwise fusion", r"fusion|loop_|input_|elementwise|convert|add|multiply|select"),
)


def classify(name: str) -> str:
  low = name.lower()
  for cls, pattern in CLASSES:
    if re.search(pattern, low):
      return cls
  return "other"


def load_trace(path) -> dict:
  """A perfetto_trace.json.gz (or a directory holding one, newest first) -> the JSON dict."""
  p = pathlib.Path(path)
  if p.is_dir():
    found = sorted(p.rglob("*.trace.json.gz")) + sorted(p.rglob("perfetto_trace.json.gz"))
    if not found:
      raise FileNotFoundError(f"no *.trace.json.gz / perfetto_trace.json.gz under {p}")
    p = max(found, key=lambda f: f.stat().st_mtime)
  opener = gzip.open if p.suffix == ".gz" else open
  with opener(p, "rt") as f:
    return json.load(f)


def _union(intervals) -> float:
  total, end = 0.0, float("-inf")
  for s, e in sorted(intervals):
    if e <= end:
      continue
    total += e - max(s, end)
    end = e
  return total


def summarize(trace: dict, steps: int) -> dict:
  """Trace JSON -> kernels per step, time by class (ms per step and share), busy fraction, gaps."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
  device_pids = {pid for pid, n in names.items() if "/device:" in n and "cpu" not in n.lower()}
  if device_pids:
    source = "device: " + ", ".join(sorted(names[p] for p in device_pids))
    kern = [e for e in complete if e["pid"] in device_pids]
    # The device plane also carries derived lines ("XLA Modules", "XLA Ops") that repeat the
    # kernels' time per HLO op: keep the stream lines when there are any.
    streams = {k for k, n in threads.items() if k[0] in device_pids and n.startswith("Stream")}
    if streams:
      kern = [e for e in kern if (e["pid"], e.get("tid")) in streams]
  else:  # CPU: the host's events named like HLO instructions ("fusion.12", "while.3"), not the
    # runtime's frames ("ThunkExecutor::Execute") or Python's
    source = "host XLA ops (no device timeline)"
    kern = [e for e in complete if re.fullmatch(r"[a-z][\w\-]*\.\d+", e.get("name", ""))]
  if not kern:
    return {"source": source, "kernels": 0, "steps": steps, "error": "no kernel events found"}
  by_class = collections.defaultdict(lambda: [0, 0.0])
  by_name = collections.defaultdict(lambda: [0, 0.0])
  for e in kern:
    c = by_class[classify(e["name"])]
    c[0] += 1
    c[1] += e["dur"]
    n = by_name[e["name"]]
    n[0] += 1
    n[1] += e["dur"]
  spans = [(e["ts"], e["ts"] + e["dur"]) for e in kern]
  start, end = min(s for s, _ in spans), max(e for _, e in spans)
  busy = _union(spans)
  gaps, last = [], None
  for s, e in sorted(spans):
    if last is not None and s > last:
      gaps.append(s - last)
    last = e if last is None else max(last, e)
  total = sum(d for _, d in by_class.values()) or 1.0
  ms = lambda us: round(us / 1e3 / steps, 4)
  return {
      "source": source, "steps": steps, "kernels": len(kern),
      "kernels_per_step": round(len(kern) / steps, 1),
      "span_ms_per_step": ms(end - start), "busy_ms_per_step": ms(busy),
      "busy_fraction": round(busy / max(end - start, 1e-9), 4),
      "gap_ms_per_step": ms(sum(gaps)), "gaps_over_10us": sum(g > 10 for g in gaps),
      "largest_gaps_us": [round(g, 1) for g in sorted(gaps)[-5:][::-1]],
      "by_class": {k: {"kernels_per_step": round(n / steps, 1), "ms_per_step": ms(d),
                       "share": round(d / total, 4)}
                   for k, (n, d) in sorted(by_class.items(), key=lambda kv: -kv[1][1])},
      "top_kernels": [{"name": k[:120], "calls_per_step": round(n / steps, 1), "ms_per_step": ms(d)}
                      for k, (n, d) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:12]],
  }


def table(s: dict) -> str:
  if s.get("error"):
    return f"profile ({s['source']}): {s['error']}"
  lines = [f"profile over {s['steps']} steps ({s['source']}): {s['kernels_per_step']} kernels/step, "
           f"span {s['span_ms_per_step']} ms/step, busy {s['busy_ms_per_step']} ms "
           f"({100 * s['busy_fraction']:.1f}%), gaps {s['gap_ms_per_step']} ms/step "
           f"({s['gaps_over_10us']} gaps > 10 us, largest {s['largest_gaps_us']} us)",
           "| class | kernels/step | ms/step | share |", "| --- | ---: | ---: | ---: |"]
  for k, v in s["by_class"].items():
    lines.append(f"| {k} | {v['kernels_per_step']} | {v['ms_per_step']} | "
                 f"{100 * v['share']:.1f}% |")
  lines += ["", "| top kernel | calls/step | ms/step |", "| --- | ---: | ---: |"]
  lines += [f"| `{k['name']}` | {k['calls_per_step']} | {k['ms_per_step']} |"
            for k in s["top_kernels"]]
  return "\n".join(lines)


def profile(args) -> dict:
  import jax
  import step_cost
  make = step_cost.reference_step if args.reference else step_cost.jaxft_step
  kw = {} if args.reference else {"variant": args.variant}
  step, state, batch, rng = make(args.kind, args.seq, args.batch, tiny=args.tiny, **kw)
  fn = jax.jit(step, donate_argnums=0)
  for _ in range(args.warmup):
    state, metrics = fn(state, batch, rng)
  jax.block_until_ready(metrics)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  with jax.profiler.trace(str(out / "trace"), create_perfetto_trace=True):
    for _ in range(args.steps):
      state, metrics = fn(state, batch, rng)
    jax.block_until_ready(metrics)
  wall = (time.perf_counter() - t0) / args.steps
  s = summarize(load_trace(out / "trace"), args.steps)
  s.update(wall_ms_per_step=round(1e3 * wall, 3), kind=args.kind, seq=args.seq, batch=args.batch,
           impl="reference" if args.reference else "jaxft", backend=jax.default_backend())
  return s


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--trace", default=None, help="summarise this trace (file or dir) and exit")
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--kind", default="supervised")
  p.add_argument("--variant", default="default")
  p.add_argument("--reference", action="store_true")
  p.add_argument("--tiny", action="store_true")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--out", default="profile_out")
  a = p.parse_args(argv)
  s = summarize(load_trace(a.trace), a.steps) if a.trace else profile(a)
  print(table(s))
  if not a.trace:
    (pathlib.Path(a.out) / "profile_summary.json").write_text(json.dumps(s, indent=1))
  print(json.dumps(s), flush=True)
  return s


if __name__ == "__main__":
  main()
