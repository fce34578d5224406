"""benchmarks/diag: dot_census.py's FLOPs read off the step's jaxpr agree with the model-FLOPs
formula and are sorted by operand dtype; memory_plan.py compares the compiled steps' buffers;
oracle_pseudo_labels.py writes self-training's true-label controls."""

import importlib.util
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


def diag(name: str):
  """benchmarks/diag/<name>.py as a module (the scripts are not a package)."""
  spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "diag" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_bf16_step_matches_the_flops_formula_and_names_the_float32_dots(capsys):
  assert diag("dot_census").main(["--tiny", "--seq", "32", "--batch", "4"]) == 0
  out = capsys.readouterr().out
  ratio = float(re.search(r"\(([\d.]+)x the model-FLOPs formula", out).group(1))
  assert ratio == 1.0  # every matmul of forward + backward counted once, nothing extra
  shares = {m[0]: float(m[1]) for m in re.findall(r"\| (\S+ x \S+ -> \S+) \| \d+ \| [\d.]+ \| ([\d.]+)%", out)}
  assert shares["bfloat16 x bfloat16 -> bfloat16"] > 50.0
  assert abs(sum(shares.values()) - 100.0) < 0.1
  # the float32 attention probabilities times bf16 values: listed with their shapes
  assert "largest dots with an operand not in bfloat16" in out and "(4, 2, 32, 1, 32)" in out
  assert float(re.search(r"random bits drawn: ([\d.]+) MB", out).group(1)) > 0


def test_float32_step_has_only_float32_dots(capsys):
  assert diag("dot_census").main(["--tiny", "--seq", "16", "--batch", "2", "--dtype", "float32"]) == 0
  out = capsys.readouterr().out
  assert re.findall(r"\| (\S+ x \S+ -> \S+) \|", out) == ["float32 x float32 -> float32"]


def test_memory_plan_lora_needs_less_than_full_fine_tuning(capsys):
  assert diag("memory_plan").main(["--tiny", "--seq", "16", "--batch", "8"]) == 0
  rows = {m[0]: m for m in re.findall(r"\| (\w+) \| ([\d,]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \|",
                                      capsys.readouterr().out)}
  full, lora = rows["supervised"], rows["lora"]
  assert float(full[5]) == 1.0 and float(lora[5]) < 1.0
  assert int(lora[1].replace(",", "")) < int(full[1].replace(",", "")) / 10
  assert float(lora[2]) < float(full[2])  # no Adam moments for the frozen weights


def test_oracle_controls_keep_the_rows_or_draw_as_many_with_true_labels(tiny_bert_dir, tmp_path):
  import json

  import numpy as np

  from jaxft.data import pipeline, pseudo_labels
  from jaxft.train.setup import load_tokenizer
  from tests.train.test_loop import make_config
  c = make_config(tiny_bert_dir, data__labeled_per_class=8)
  data = pipeline.build(c.data, load_tokenizer(c.model.name), batch_size=8, eval_batch_size=16,
                        seed=int(c.seed))
  truth = np.asarray(data.unlabeled_labels)
  rows = np.array([1, 4, 9, 30])
  made = pseudo_labels.save(tmp_path / "r1.json", data.unlabeled, rows, 1 - truth[rows])  # all wrong
  oracle = diag("oracle_pseudo_labels")
  got = oracle.control_file(c, made, tmp_path / "same.json", "same")
  assert got["teacher_label_accuracy"] == 0.0 and got["rows"] == 4
  same = json.loads((tmp_path / "same.json").read_text())
  assert same["rows"] == rows.tolist() and same["labels"] == truth[rows].tolist()
  oracle.control_file(c, made, tmp_path / "random.json", "random")
  rnd = json.loads((tmp_path / "random.json").read_text())
  assert len(set(rnd["rows"])) == 4 and rnd["labels"] == truth[rnd["rows"]].tolist()
  # the files are valid data.pseudo_labels for the same pool
  pseudo_labels.load(tmp_path / "random.json", data.unlabeled, data.info.num_labels)
