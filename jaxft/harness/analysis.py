"""Looking inside a finished run: per-class report, confusion matrix, calibration, token attributions.

Everything takes arrays (logits [N, C] float, labels [N] int) and, for attributions, an apply_fn,
params and a batch, so it works in a notebook and in tests without a workdir. `analyze_workdir`
glues it to a workdir through jaxft.train.restore.load_workdir; `load_workdir_params` reads several
finished runs' parameters for the soups of jaxft.eval.ensemble.

Calibration (Guo et al. 2017): confidence c_n = max_k softmax(logits_n)_k, correct a_n = [argmax =
y_n]; M = 15 equal-width bins B_m = (m/M, (m+1)/M] (c = 0 goes to the first bin);
ECE = sum_m |B_m| / N * |acc(B_m) - conf(B_m)|.

Integrated gradients (Sundararajan et al. 2017) on the embedding output e [B, S, H] (the tensor the
model's `embedding_perturbation` is added to), baseline e' = 0 (perturbation -e), path
e(alpha) = alpha * e, i.e. perturbation (alpha - 1) * e:
  IG_{i,h} = e_{i,h} * (1/m) sum_{k=1..m} dF(alpha_k e)/de_{i,h},  alpha_k = (k - 1/2) / m  (midpoint
  rule, m = 32 steps), attribution of token i = sum_h IG_{i,h}; F = the target class logit
  (regression: the output). Completeness: sum_i attr_i ~= F(e) - F(0).
"""

from __future__ import annotations

import html
import json
import pathlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def _check(logits, labels):
  logits, labels = np.asarray(logits), np.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"expected logits [N, C] and labels [N]; got {logits.shape} and {labels.shape}")
  return logits, labels.astype(np.int64)


def classification_report(logits, labels, label_names: Sequence[str] | None = None) -> dict:
  """sklearn.metrics.classification_report(output_dict=True) of argmax predictions: per-class
  precision / recall / f1-score / support, plus accuracy, macro avg, weighted avg."""
  from sklearn import metrics
  logits, labels = _check(logits, labels)
  num = logits.shape[1]
  names = list(label_names) if label_names else [str(i) for i in range(num)]
  return metrics.classification_report(labels, logits.argmax(-1), labels=list(range(num)),
                                       target_names=names, output_dict=True, zero_division=0)


def confusion(logits, labels) -> np.ndarray:
  """[C, C] int64 counts, rows = true class, columns = predicted class."""
  logits, labels = _check(logits, labels)
  num = logits.shape[1]
  m = np.zeros((num, num), np.int64)
  np.add.at(m, (labels, logits.argmax(-1)), 1)
  return m


def calibration(logits, labels, num_bins: int = 15) -> dict:
  """ECE and the reliability diagram's bins (see module docstring).

  Returns {"ece", "bins": [{"low", "high", "count", "accuracy", "confidence"}], "num_bins"}.
  """
  logits, labels = _check(logits, labels)
  probs = softmax(logits)
  conf = probs.max(-1)
  correct = (probs.argmax(-1) == labels).astype(np.float64)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  # bin m holds (edges[m], edges[m+1]]; searchsorted(side="left") - 1 gives that, 0 -> bin 0
  idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, num_bins - 1)
  n = len(labels)
  ece, bins = 0.0, []
  for m in range(num_bins):
    sel = idx == m
    count = int(sel.sum())
    acc = float(correct[sel].mean()) if count else 0.0
    cm = float(conf[sel].mean()) if count else 0.0
    ece += count / n * abs(acc - cm)
    bins.append({"low": float(edges[m]), "high": float(edges[m + 1]), "count": count,
                 "accuracy": acc, "confidence": cm})
  return {"ece": float(ece), "bins": bins, "num_bins": num_bins}


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_confusion(matrix: np.ndarray, out, label_names: Sequence[str] | None = None,
                   normalize: bool = True) -> pathlib.Path:
  """Confusion matrix heatmap (row-normalised when normalize), counts written in the cells."""
  plt = _pyplot()
  m = np.asarray(matrix, np.float64)
  shown = m / np.maximum(m.sum(1, keepdims=True), 1) if normalize else m
  num = m.shape[0]
  names = list(label_names) if label_names else [str(i) for i in range(num)]
  size = max(3.5, 0.6 * num + 2)
  fig, ax = plt.subplots(figsize=(size, size))
  im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
  for i in range(num):
    for j in range(num):
      ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=8,
              color="white" if shown[i, j] > 0.6 * (shown.max() or 1) else "black")
  ax.set_xticks(range(num), names, rotation=45, ha="right", fontsize=8)
  ax.set_yticks(range(num), names, fontsize=8)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  out = pathlib.Path(out)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def plot_reliability(calib: dict, out) -> pathlib.Path:
  plt = _pyplot()
  bins = calib["bins"]
  centers = [(b["low"] + b["high"]) / 2 for b in bins]
  width = bins[0]["high"] - bins[0]["low"]
  fig, ax = plt.subplots(figsize=(4, 4))
  ax.bar(centers, [b["accuracy"] if b["count"] else 0 for b in bins], width=width * 0.95,
         edgecolor="black", alpha=0.8, label="accuracy")
  ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
  ax.set_xlabel("confidence")
  ax.set_ylabel("accuracy")
  ax.set_title(f"ECE = {calib['ece']:.4f} ({calib['num_bins']} bins)", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  out = pathlib.Path(out)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def integrated_gradients(apply_fn: Callable, params, batch: dict, targets=None, steps: int = 32
                         ) -> tuple[np.ndarray, np.ndarray]:
  """Token attributions [B, S] float32 and the forward values (F(e), F(0)) [2, B] (module docstring).

  targets: [B] int class ids whose logit is explained (default: the predicted class); ignored for
  a single-output (regression) head. Padding positions (attention_mask 0) get attribution 0.
  """
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  out = apply_fn(params, batch, deterministic=True)
  emb = out.embeddings
  logits = out.logits
  if logits is None or logits.ndim != 2:
    raise ValueError("integrated_gradients explains sequence-level heads (logits [B, C]); got "
                     f"{None if logits is None else logits.shape}")
  if targets is None:
    targets = jnp.argmax(logits, -1) if logits.shape[-1] > 1 else jnp.zeros(logits.shape[:1], int)
  targets = jnp.asarray(targets, jnp.int32)

  def f(delta):  # sum over the batch: examples do not interact, so grads stay per example
    lg = apply_fn(params, batch, deterministic=True, embedding_perturbation=delta).logits
    return jnp.take_along_axis(lg.astype(jnp.float32), targets[:, None], axis=-1).sum(), lg

  grad_f = jax.jit(jax.grad(lambda d: f(d)[0]))
  alphas = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps
  total = jnp.zeros_like(emb, dtype=jnp.float32)
  for a in alphas:  # a Python loop keeps memory at one backward pass
    total = total + grad_f((a - 1.0) * emb)
  attr = jnp.sum(emb.astype(jnp.float32) * total / steps, axis=-1)
  if "attention_mask" in batch:
    attr = attr * batch["attention_mask"].astype(jnp.float32)
  pick = lambda lg: jnp.take_along_axis(lg.astype(jnp.float32), targets[:, None], -1)[:, 0]
  f_x = pick(logits)
  f_0 = pick(f(-emb)[1])
  return np.asarray(attr), np.asarray(jnp.stack([f_x, f_0]))


def attribution_html(tokens: Sequence[Sequence[str]], attributions, *, titles: Sequence[str] = ()
                     ) -> str:
  """A self-contained HTML page: each token's background red (positive) or blue (negative), the
  strength |a_i| / max_i |a_i| of its example; hovering shows the value."""
  parts = ["<!doctype html><meta charset='utf-8'><title>jaxft token attributions</title>",
           "<style>body{font-family:sans-serif;max-width:60em}span.t{padding:1px 2px;margin:1px;"
           "border-radius:3px;display:inline-block}</style>",
           "<h2>Integrated gradients (embedding output, zero baseline)</h2>"]
  for n, toks in enumerate(tokens):
    a = np.asarray(attributions[n], np.float64)[:len(toks)]
    scale = np.abs(a).max() or 1.0
    title = titles[n] if n < len(titles) else f"example {n}"
    parts.append(f"<h4>{html.escape(title)}</h4><p>")
    for tok, v in zip(toks, a):
      s = float(v / scale)
      color = (f"rgba(220,40,40,{abs(s):.3f})" if s >= 0 else f"rgba(40,90,220,{abs(s):.3f})")
      parts.append(f"<span class='t' style='background:{color}' title='{v:.4g}'>"
                   f"{html.escape(tok)}</span>")
    parts.append("</p>")
  return "\n".join(parts) + "\n"


def analyze_workdir(workdir, split: str | None = None, examples: Sequence[int] = (0, 1, 2, 3),
                    out_dir=None, steps: int = 32) -> pathlib.Path:
  """Writes <workdir>/analysis/: report.json (per-class report, calibration), confusion.png,
  reliability.png and attributions.html (IG for the chosen eval examples). Classification only."""
  from jaxft.data import packing
  from jaxft.train.evaluate import Evaluator
  from jaxft.train.restore import load_workdir
  from jaxft.train.setup import load_tokenizer

  workdir = pathlib.Path(workdir)
  out = pathlib.Path(out_dir) if out_dir else workdir / "analysis"
  out.mkdir(parents=True, exist_ok=True)
  setup, state = load_workdir(workdir)
  info = setup.data.info
  if info.kind != "classification":
    raise ValueError(f"analysis covers classification tasks; {info.name} is {info.kind}")
  ev = Evaluator(setup, split)
  logits, labels = ev.logits_and_labels(state)
  names = list(info.label_names) or None
  report = {"task": info.name, "split": ev.split, "num_examples": int(len(labels)),
            "classification_report": classification_report(logits, labels, names)}
  calib = calibration(logits, labels)
  report["calibration"] = calib
  (out / "report.json").write_text(json.dumps(report, indent=2))
  plot_confusion(confusion(logits, labels), out / "confusion.png", names)
  plot_reliability(calib, out / "reliability.png")

  # Attributions for the chosen examples: gather them from the eval batches in order.
  wanted, rows, index = set(examples), [], 0
  for batch in setup.data.eval[ev.split]():
    if "segment_ids" in batch:  # packed: one padded row per slot, as IG reads them
      batch = {**packing.slots_as_rows(batch), "labels": batch["labels"],
               "example_mask": batch["example_mask"]}
    for j in np.flatnonzero(np.asarray(batch["example_mask"]) > 0):
      if index in wanted:
        rows.append((index, {k: np.asarray(v)[j] for k, v in batch.items()}))
      index += 1
    if len(rows) == len(wanted):
      break
  if rows:
    sub = {k: np.stack([r[k] for _, r in rows]) for k in rows[0][1]}
    attr, fx = integrated_gradients(setup.model.apply, state.params, sub, steps=steps)
    tok = load_tokenizer(setup.config.model.name)
    name = lambda c: names[c] if names and 0 <= c < len(names) else str(c)
    toks, titles = [], []
    for i, (n_ex, _) in enumerate(rows):
      n = int(sub["attention_mask"][i].sum())
      toks.append(tok.convert_ids_to_tokens(sub["input_ids"][i][:n].tolist()))
      pred, lab = int(np.argmax(logits[n_ex])), int(sub["labels"][i])
      titles.append(f"example {n_ex}: true {name(lab)}, predicted {name(pred)}; sum of "
                    f"attributions {attr[i].sum():.3f} vs F(x) - F(0) {fx[0, i] - fx[1, i]:.3f}")
    (out / "attributions.html").write_text(attribution_html(toks, attr, titles=titles))
  return out


def load_workdir_params(workdirs: Sequence, which: str = "best") -> list:
  """The nested params of several finished workdirs (one model each), e.g. the ingredients of
  `jaxft.eval.ensemble.uniform_soup` / `greedy_soup`; every workdir must hold the same model and
  PEFT method."""
  from jaxft.train.restore import load_workdir
  out = []
  for w in workdirs:
    _, state = load_workdir(w, which)
    out.append(state.params)
  return out
