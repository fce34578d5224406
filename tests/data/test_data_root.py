"""Where a task reads its files when data.data_dir is unset: packaged data, else
<data root>/<task folder> ($JAXFT_DATA, else ../shared/data), else the hub."""

import pathlib

from jaxft.data import tasks


def test_data_root_from_the_environment_then_shared_data(tmp_path, monkeypatch, shared_data):
  monkeypatch.delenv(tasks.DATA_ROOT_ENV, raising=False)
  monkeypatch.chdir(pathlib.Path(__file__).resolve().parents[2])
  assert tasks.data_root() == shared_data.resolve()
  assert tasks.default_data_dir(tasks.get("rte")) == shared_data.resolve() / "glue"
  assert tasks.default_data_dir(tasks.get("conll2003")) == shared_data.resolve() / "conll2003"
  assert tasks.default_data_dir(tasks.get("imdb")) is None  # no folder: the hub
  assert tasks.default_data_dir(tasks.get("mr")).name == "mr"  # packaged data first

  (tmp_path / "glue").mkdir()
  monkeypatch.setenv(tasks.DATA_ROOT_ENV, str(tmp_path))
  assert tasks.data_root() == tmp_path
  assert tasks.default_data_dir(tasks.get("cola")) == tmp_path / "glue"
  assert tasks.default_data_dir(tasks.get("ag_news")) is None  # not under this root


def test_a_glue_task_loads_without_data_dir(monkeypatch):
  import ml_collections
  monkeypatch.delenv(tasks.DATA_ROOT_ENV, raising=False)
  monkeypatch.chdir(pathlib.Path(__file__).resolve().parents[2])
  info, splits = tasks.load(ml_collections.ConfigDict({"name": "rte", "data_dir": ""}),
                            ["validation"])
  assert info.name == "rte" and len(splits["validation"]) == 277
  assert "glue/RTE/dev.tsv" in splits["validation"].source
