"""The quickstart end to end: packed vs length buckets vs a plain Hugging Face PyTorch loop.

    python benchmarks/packing_quickstart.py                 # all three, one after the other
    python benchmarks/packing_quickstart.py --runs packed,bucketed --steps 100

Each jaxft run is a fresh `jaxft train --config experiments/quickstart.py` process (MR,
all-MiniLM-L6-v2, batch 32, max length 64, lr 1e-4, one epoch = 298 steps, eval at the end);
`--config.data.packing=false` gives the bucketed one (buckets 32/64). The PyTorch loop is what a
user writes with transformers: the same checkpoint and tokenized examples, shuffled, padded to
the longest row of each batch, BertForSequenceClassification (SDPA attention) in train mode,
AdamW (weight decay 0.01), linear warmup 6% then decay, clipping 1.0; then eval at batch 128,
also padded per batch. Reported per run: process wall time (start to exit), train + eval time
(first step to the end, as results.json's wall time counts it for jaxft: model load and the
first compile included), time from process start to the first logged train step, validation
accuracy, and the share of computed tokens that is padding. Run nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def jaxft_run(packing: bool, workdir: pathlib.Path, steps: int) -> dict:
  argv = [sys.executable, "-m", "jaxft.cli", "train", "--config", "experiments/quickstart.py",
          "--workdir", str(workdir), f"--config.data.packing={str(packing).lower()}"]
  if steps:
    argv += [f"--config.train.num_steps={steps}"]
  t0 = time.time()
  subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wall = time.time() - t0
  res = json.loads((workdir / "results.json").read_text())
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  first_train = min(r["time"] for r in rows if r["kind"] == "train")
  info = next(r for r in rows if r["kind"] == "info")
  return {"run": "jaxft packed" if packing else "jaxft bucketed", "process_s": wall,
          "train_eval_s": res["wall_time_s"], "first_log_s": first_train - t0,
          "accuracy": res["eval"]["accuracy"],
          "train_padding": info.get("data/train/padding_fraction"),
          "eval_padding": info.get("data/validation/padding_fraction"),
          "compilations": res.get("compilations")}


def torch_run(steps: int, seed: int = 0) -> dict:
  t_start = time.time()
  import numpy as np
  import torch
  import transformers as T

  from jaxft import assets
  from jaxft.config import base_config, movie_reviews_cpu
  from jaxft.data import pipeline

  torch.manual_seed(seed)
  model_dir = assets.fetch("minilm-l6")
  tok = T.AutoTokenizer.from_pretrained(str(model_dir))
  c = movie_reviews_cpu(base_config())
  data = pipeline.build(c.data, tok, batch_size=32, eval_batch_size=128, seed=seed, packing=False)
  train, val = data.encoded["train"], data.encoded["validation"]
  model = T.BertForSequenceClassification.from_pretrained(str(model_dir), num_labels=2,
                                                          attn_implementation="sdpa")
  total = steps or len(train) // 32
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  warm = int(0.06 * total)
  sched = torch.optim.lr_scheduler.LambdaLR(
      opt, lambda s: (s + 1) / max(warm, 1) if s < warm else max(0.0, (total - s) / (total - warm)))

  def batch(enc, rows):
    n = max(int(enc.lengths[rows].max()), 1)
    ids = np.full((len(rows), n), enc.pad_id, np.int64)
    mask = np.zeros((len(rows), n), np.int64)
    for j, i in enumerate(rows):
      sl = enc.row(int(i))
      ids[j, :sl.stop - sl.start] = enc.input_ids[sl]
      mask[j, :sl.stop - sl.start] = 1
    return torch.tensor(ids), torch.tensor(mask), n * len(rows)

  rng = np.random.default_rng(seed)
  perm = rng.permutation(len(train))
  computed = real = 0
  t0 = time.time()
  first = None
  model.train()
  for s in range(total):
    rows = perm[(s * 32) % (len(perm) - 31):][:32]
    ids, mask, n = batch(train, rows)
    labels = torch.tensor(train.labels[rows], dtype=torch.long)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    computed += n
    real += int(train.lengths[rows].sum())
    if first is None:
      first = time.time()
  model.eval()
  correct = 0
  with torch.no_grad():
    for a in range(0, len(val), 128):
      rows = np.arange(a, min(a + 128, len(val)))
      ids, mask, _ = batch(val, rows)
      pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1).numpy()
      correct += int((pred == val.labels[rows]).sum())
  end = time.time()
  return {"run": "HF PyTorch loop", "process_s": end - t_start, "train_eval_s": end - t0,
          "first_log_s": first - t_start, "accuracy": correct / len(val),
          "train_padding": 1 - real / computed, "eval_padding": None, "compilations": None}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--runs", default="bucketed,packed,torch")
  ap.add_argument("--steps", type=int, default=0, help="0 = one epoch (298 steps)")
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.runs.split(","):
      if name == "torch":
        rows.append(torch_run(args.steps))
      else:
        rows.append(jaxft_run(name == "packed", pathlib.Path(tmp) / name, args.steps))
      print(json.dumps(rows[-1]), flush=True)
  fmt = lambda v, f: "" if v is None else f.format(v)
  lines = ["| run | process s | train + eval s | start -> first log s | accuracy | train padding "
           "| eval padding |", "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    lines.append(f"| {r['run']} | {r['process_s']:.1f} | {r['train_eval_s']:.1f} | "
                 f"{r['first_log_s']:.1f} | {100 * r['accuracy']:.2f} | "
                 f"{fmt(r['train_padding'], '{:.1%}')} | {fmt(r['eval_padding'], '{:.1%}')} |")
  table = "\n".join(lines)
  print(table)
  if args.out:
    pathlib.Path(args.out).write_text(table + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
