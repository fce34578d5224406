"""The grid runner's planning and bookkeeping: grids and rows, From inputs, seeds, failures,
docs assembly. The real end-to-end runs (tables, reuse, a killed run) are test_tables_real.py."""

import argparse
import json
import pathlib
import shutil
import textwrap

import pytest

from jaxft.harness import cli as harness_cli
from jaxft.harness import docs, grid

EXPERIMENT = textwrap.dedent('''
    """A test grid: a teacher and a student of it; a second grid of two batch sizes."""
    from jaxft.config import base_config
    from jaxft.harness.grid import From, Row

    GRIDS = {
        "paper": {"small": "8", "large": "16"},
        "cpu": {"teacher": "8",
                "student": Row("8", {"distill.teacher": From("teacher", "export"),
                                     "train.learning_rate": 1e-3, "model.remat": True},
                               evaluate={"int8": True}),
                "other": "16"},
    }
    PAPER = {("small", "accuracy"): 80.0}
    SEARCH = {"train.learning_rate": ("log_uniform", 1e-5, 1e-3),
              "train.batch_size": ("choice", [8, 16])}

    def get_config(arg=None):
      c = base_config()
      c.data.name = "mr"
      c.train.batch_size = int(arg or 8)
      return c
''')


@pytest.fixture
def experiment(tmp_path):
  path = tmp_path / "toy.py"
  path.write_text(EXPERIMENT)
  return path


def test_plan_names_workdirs_and_sets_seeds(experiment, tmp_path):
  module = grid.load_module(experiment)
  rows = grid.select_rows(grid.grid_of(module, experiment), ["large"])
  runs = grid.plan(experiment, rows, grid.parse_seeds("0,2"), tmp_path / "root",
                   [("train.num_steps", "5")])
  assert [r.workdir for r in runs] == [tmp_path / "root/large/seed0", tmp_path / "root/large/seed2"]
  cfg = runs[1].config()
  assert cfg.seed == 2 and cfg.train.batch_size == 16 and cfg.train.num_steps == 5
  assert cfg.experiment == f"{experiment}:16"
  assert runs[0].cli_args()[-2:] == ["--config.train.num_steps=5", "--config.seed=0"]
  assert grid.parse_seeds("3") == [0, 1, 2]
  with pytest.raises(KeyError, match="unknown rows"):
    grid.select_rows(grid.grid_of(module, experiment), ["huge"])
  with pytest.raises(ValueError, match="--seeds"):
    grid.parse_seeds("two")
  with pytest.raises(ValueError, match="set per run"):
    grid.plan(experiment, rows, [0], tmp_path, [("seed", "3")])


def test_grids_are_chosen_by_name_and_rows_take_values_from_earlier_rows(experiment, tmp_path):
  module = grid.load_module(experiment)
  assert list(grid.grid_of(module, experiment)) == ["small", "large"]  # the first grid
  assert grid.grid_name(module, experiment, "") == "paper"
  with pytest.raises(KeyError, match="declares the grids paper, cpu"):
    grid.grid_of(module, experiment, "gpu")
  cpu = grid.grid_of(module, experiment, "cpu")
  # --only student brings its teacher along, in grid order
  assert list(grid.select_rows(cpu, ["student"])) == ["teacher", "student"]
  root = tmp_path / "root"
  runs = grid.plan(experiment, grid.select_rows(cpu, ["student"]), [1], root,
                   [("train.learning_rate", "5e-4")])
  student = runs[1]
  assert student.overrides == [("distill.teacher", str(root / "teacher/seed1/export")),
                               ("train.learning_rate", "0.001"), ("model.remat", "true"),
                               ("train.learning_rate", "5e-4"), ("seed", "1")]
  cfg = student.config()  # the command line comes last and wins
  assert cfg.distill.teacher == str(root / "teacher/seed1/export") and cfg.model.remat is True
  assert cfg.train.learning_rate == 5e-4
  assert [i.source_workdir for i in student.inputs] == [root / "teacher/seed1"]
  assert student.evaluate == {"int8": True}
  assert student.eval_file() == root / "student/seed1/eval_validation_best.json"
  with pytest.raises(RuntimeError, match="takes export of teacher/seed1, which has not finished"):
    student.prepare()


def test_grids_are_checked(tmp_path):
  def load(body):
    path = tmp_path / "bad.py"
    path.write_text("from jaxft.harness.grid import From, Row\n" + textwrap.dedent(body))
    return grid.grids_of(grid.load_module(path), path)

  with pytest.raises(ValueError, match="defines GRID; jaxft table reads GRIDS"):
    load('GRID = {"a": "x"}')
  with pytest.raises(ValueError, match="defines no GRIDS"):
    load("X = 1")
  with pytest.raises(ValueError, match="plain directory name"):
    load('GRIDS = {"cpu": {"a/b": "x"}}')
  with pytest.raises(ValueError, match="not an earlier row"):
    load('GRIDS = {"cpu": {"s": Row("x", {"distill.teacher": From("t", "export")}), "t": "x"}}')
  with pytest.raises(ValueError, match="what is one of"):
    load('GRIDS = {"cpu": {"s": Row("x", {"a.b": From("t", "model")})}}')
  with pytest.raises(ValueError, match="a file needs make"):
    load('GRIDS = {"cpu": {"s": Row("x", {"a.b": From("t", "file")})}}')


def test_keep_going_reports_failures_and_continues(experiment, tmp_path):
  module = grid.load_module(experiment)
  runs = grid.plan(experiment, grid.grid_of(module, experiment), [0], tmp_path)
  calls = []

  def flaky(config, workdir):
    calls.append(config.train.batch_size)
    if config.train.batch_size == 8:
      raise RuntimeError("out of memory")
    workdir.mkdir(parents=True)
    (workdir / "results.json").write_text(json.dumps(
        {"main_metric": "accuracy", "eval": {"accuracy": 0.5}, "best": {"accuracy": 0.5}}))

  out = grid.run_grid(runs, run_fn=flaky, keep_going=True)
  assert calls == [8, 16] and out["small"] == [] and len(out["large"]) == 1
  with pytest.raises(RuntimeError, match="out of memory"):
    grid.run_grid(runs, run_fn=flaky)


def test_cli_rejects_bad_override_before_running(experiment, tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(grid, "default_run_fn", lambda config, workdir: calls.append(workdir))
  args = argparse.Namespace(experiment=str(experiment))
  with pytest.raises(KeyError, match="learning_rat"):
    harness_cli.main(args, ["--workdir-root", str(tmp_path), "--config.train.learning_rat=1"])
  with pytest.raises(KeyError, match="--grid 'gpu'"):
    harness_cli.main(args, ["--grid", "gpu", "--workdir-root", str(tmp_path)])
  assert calls == []


def test_cli_refuses_runs_of_an_older_config_before_running(experiment, tmp_path, monkeypatch):
  from jaxft import config as config_lib
  calls = []
  monkeypatch.setattr(grid, "default_run_fn", lambda config, workdir: calls.append(workdir))
  args = argparse.Namespace(experiment=str(experiment))
  root = tmp_path / "root"
  run = grid.plan(experiment, {"other": "16"}, [0], root)[0]
  run.workdir.mkdir(parents=True)
  old = run.config()
  old.train.learning_rate = 5e-5  # as the experiment file said when this run was made
  saved = json.loads(config_lib.to_json(old))
  del saved["objective"]["rdrop"]  # and an objective added since: not a difference
  (run.workdir / "config.json").write_text(json.dumps(saved))
  (run.workdir / "results.json").write_text(json.dumps({"eval": {"accuracy": 0.5}}))
  assert "train.learning_rate: 5e-05 -> 2e-05" in run.stale()
  assert "rdrop" not in run.stale()
  with pytest.raises(ValueError, match="another config than the grid now gives"):
    harness_cli.main(args, ["--grid", "cpu", "--workdir-root", str(root), "--only", "other"])
  assert calls == [] and (run.workdir / "results.json").is_file()  # nothing moved or lost
  saved["train"]["learning_rate"] = 2e-5
  (run.workdir / "config.json").write_text(json.dumps(saved))
  assert run.stale() == ""


def test_results_md_holds_exactly_the_published_tables(tmp_path):
  """docs/results.md's generated parts are what `jaxft table --docs` writes from docs/tables/, and
  every published table appears in it."""
  repo_docs = pathlib.Path(__file__).resolve().parents[2] / "docs"
  shutil.copytree(repo_docs / "tables", tmp_path / "tables")
  doc = tmp_path / "results.md"
  doc.write_text((repo_docs / "results.md").read_text())
  filled = docs.assemble(doc)
  assert doc.read_text() == (repo_docs / "results.md").read_text(), "run `jaxft table --docs`"
  published = {str(p.parent.relative_to(tmp_path)) for p in tmp_path.glob("tables/**/table.md")}
  assert published == set(filled), published ^ set(filled)


def test_docs_refreshes_marked_tables_and_keeps_the_prose(tmp_path):
  folder = tmp_path / "tables" / "toy" / "cpu"
  folder.mkdir(parents=True)
  (folder / "table.md").write_text("### toy, grid cpu\n\n| row | metric |\n| --- | --- |\n| a | b |\n")
  (folder / "table.json").write_text(json.dumps({
      "command": "jaxft table experiments/toy.py --grid cpu --seeds 2", "machine": "Linux x86_64",
      "devices": ["1 x cpu"], "runs_finished": ["2026-11-27", "2026-11-28"],
      "runs": {"finished": 4, "planned": 4}}))
  (folder / "bars.png").write_bytes(b"\x89PNG")
  doc = tmp_path / "results.md"
  doc.write_text("# Results\n\nprose before\n<!-- jaxft-table tables/toy/cpu -->\nold table\n"
                 "<!-- /jaxft-table -->\nprose after\n")
  assert docs.assemble(doc) == ["tables/toy/cpu"]
  text = doc.read_text()
  assert text.startswith("# Results\n\nprose before\n<!-- jaxft-table tables/toy/cpu -->\n")
  assert text.endswith("<!-- /jaxft-table -->\nprose after\n") and "old table" not in text
  assert "- command: `jaxft table experiments/toy.py --grid cpu --seeds 2`\n" in text
  assert "- machine: Linux x86_64 (1 x cpu)\n" in text
  assert "- runs finished 2026-11-27 to 2026-11-28 (4 of 4 runs)\n" in text
  assert "| a | b |" in text and "### toy" not in text
  assert "![bars](tables/toy/cpu/bars.png)" in text and "curves.png" not in text
  assert docs.assemble(doc) == ["tables/toy/cpu"] and doc.read_text() == text  # idempotent
  (folder / "table_wide.md").write_text(
      "### toy, grid cpu\n\n| row | acc | f1 |\n| --- | --- | --- |\n")
  doc.write_text("<!-- jaxft-table tables/toy/cpu wide -->\n<!-- /jaxft-table -->\n")
  assert docs.assemble(doc) == ["tables/toy/cpu"] and "| row | acc | f1 |" in doc.read_text()
  assert "| a | b |" not in doc.read_text()
  doc.write_text("<!-- jaxft-table tables/none -->\n<!-- /jaxft-table -->\n")
  with pytest.raises(FileNotFoundError, match="publish the table first"):
    docs.assemble(doc)
  doc.write_text("<!-- jaxft-table tables/toy/cpu -->\n")
  with pytest.raises(ValueError, match="has no <!-- /jaxft-table -->"):
    docs.assemble(doc)


def test_reuse_takes_a_finished_run_with_the_same_settings_from_another_folder(experiment,
                                                                             tmp_path):
  from jaxft import config as config_lib
  calls = []

  def train(config, workdir):
    calls.append(workdir)
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text(config_lib.to_json(config))
    (workdir / "checkpoints/params.bin").write_bytes(b"\0" * (2 << 20))
    (workdir / "results.json").write_text(json.dumps(
        {"main_metric": "accuracy", "eval": {"accuracy": 0.75}, "best": {"accuracy": 0.75}}))

  elsewhere = tmp_path / "other_experiment"
  grid.run_grid(grid.plan(experiment, {"large": "16"}, [0], elsewhere), run_fn=train)
  assert len(calls) == 1
  # the same settings under another row name and root; a row that differs in one setting
  runs = grid.plan(experiment, {"big": "16", "small": "8"}, [0], tmp_path / "root")
  assert grid.same_run(runs[0], tmp_path) == elsewhere / "large/seed0"
  assert grid.same_run(runs[1], tmp_path) is None
  out = grid.run_grid(runs, run_fn=train, reuse=tmp_path)
  assert calls[1:] == [tmp_path / "root/small/seed0"]  # only the one that differs ran
  assert out["big"][0]["eval"]["accuracy"] == 0.75
  taken, source = tmp_path / "root/big/seed0", elsewhere / "large/seed0"
  assert (taken / "checkpoints/params.bin").stat().st_ino == (
      source / "checkpoints/params.bin").stat().st_ino  # hard-linked, not a second copy
  (taken / "results.json").write_text("{}")  # small files are copies: the source keeps its own
  assert json.loads((source / "results.json").read_text())["eval"]["accuracy"] == 0.75
