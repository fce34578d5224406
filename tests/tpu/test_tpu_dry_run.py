"""tpu/tpu.py in dry-run mode: the exact gcloud commands each action would run."""

import importlib.util
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tpu" / "tpu.py"


def _load():
  spec = importlib.util.spec_from_file_location("jaxft_tpu_script", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


tpu = _load()


def dry(capsys, *argv) -> list[str]:
  assert tpu.main(["--dry-run", *argv]) == 0
  return capsys.readouterr().out.splitlines()


def test_create_per_generation_versions(capsys):
  assert dry(capsys, "create", "--name", "ft", "--zone", "us-central2-b", "--type", "v4-32") == [
      "gcloud compute tpus tpu-vm create ft --zone=us-central2-b --accelerator-type=v4-32 "
      "--version=tpu-ubuntu2204-base"]
  assert dry(capsys, "create", "--name", "e", "--zone", "us-west4-a", "--type", "v5litepod-16",
             "--project", "proj", "--spot") == [
      "gcloud compute tpus tpu-vm create e --zone=us-west4-a --project=proj "
      "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot"]
  assert dry(capsys, "create", "--name", "p", "--zone", "us-east5-a", "--type", "v5p-8") == [
      "gcloud compute tpus tpu-vm create p --zone=us-east5-a --accelerator-type=v5p-8 "
      "--version=v2-alpha-tpuv5"]
  assert dry(capsys, "create", "--name", "p", "--zone", "z", "--type", "v4-8", "--version",
             "my-runtime") == [
      "gcloud compute tpus tpu-vm create p --zone=z --accelerator-type=v4-8 --version=my-runtime"]


def test_bad_accelerator_type_names_the_fix(capsys):
  assert tpu.main(["--dry-run", "create", "--name", "x", "--zone", "z", "--type", "v5e-16"]) == 2
  err = capsys.readouterr().err
  assert "v5litepod-16" in err and "v4-8" in err


def test_up_is_create_sync_setup_on_all_workers(capsys):
  lines = dry(capsys, "up", "--name", "ft", "--zone", "us-central2-b", "--type", "v4-16",
              "--src", str(ROOT))
  assert lines == [
      "gcloud compute tpus tpu-vm create ft --zone=us-central2-b --accelerator-type=v4-16 "
      "--version=tpu-ubuntu2204-base",
      f"# pack {ROOT} (git-tracked and untracked, non-ignored files) -> /tmp/jaxft-ft.tar.gz",
      "gcloud compute tpus tpu-vm scp /tmp/jaxft-ft.tar.gz 'ft:~/jaxft.tar.gz' --zone=us-central2-b "
      "--worker=all",
      "gcloud compute tpus tpu-vm ssh ft --zone=us-central2-b --worker=all "
      "'--command=mkdir -p ~/jaxft && tar xzf ~/jaxft.tar.gz -C ~/jaxft'",
      "gcloud compute tpus tpu-vm ssh ft --zone=us-central2-b --worker=all "
      "'--command=python3 -m pip install -U pip && python3 -m pip install -U '\"'\"'jax[tpu]'\"'\"' "
      "&& python3 -m pip install -e ~/jaxft'"]


def test_launch_runs_one_command_on_every_worker(capsys):
  lines = dry(capsys, "launch", "--name", "ft", "--zone", "z", "--", "train", "--config",
              "experiments/glue_small.py:sst2", "--workdir", "~/runs/sst2",
              "--config.train.batch_size=64")
  assert lines == [
      "gcloud compute tpus tpu-vm ssh ft --zone=z --worker=all '--command=cd ~/jaxft && "
      "JAXFT_MULTIHOST=1 python3 -m jaxft train --config experiments/glue_small.py:sst2 "
      "--workdir ~/runs/sst2 --config.train.batch_size=64'"]
  bg = dry(capsys, "launch", "--background", "--name", "ft", "--zone", "z", "--", "train",
           "--workdir", "runs/a b")
  # Parsed back into argv: the remote shell sees exactly this command, quoting intact.
  argv = shlex.split(bg[0])
  inner = "cd ~/jaxft && JAXFT_MULTIHOST=1 python3 -m jaxft train --workdir 'runs/a b'"
  assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ft", "--zone=z", "--worker=all",
                  f"--command=nohup sh -c {shlex.quote(inner)} > ~/jaxft-launch.log 2>&1 &"]


def test_launch_without_a_command_fails(capsys):
  assert tpu.main(["--dry-run", "launch", "--name", "ft", "--zone", "z"]) == 2
  assert "launch needs the jaxft command" in capsys.readouterr().err


def test_collect_and_delete(capsys):
  assert dry(capsys, "collect", "--name", "ft", "--zone", "z", "--project", "p", "--workdir",
             "~/runs/sst2", "--dest", "out", "--workers", "0,3") == [
      "gcloud compute tpus tpu-vm scp --recurse 'ft:~/runs/sst2' out/worker_0 --zone=z --project=p "
      "--worker=0",
      "gcloud compute tpus tpu-vm scp --recurse 'ft:~/runs/sst2' out/worker_3 --zone=z --project=p "
      "--worker=3"]
  assert not (pathlib.Path("out").exists() and pathlib.Path("out/worker_0").exists())
  assert dry(capsys, "delete", "--name", "ft", "--zone", "z") == [
      "gcloud compute tpus tpu-vm delete ft --zone=z --quiet"]


def test_dry_run_env_and_env_defaults_through_the_cli():
  env = {**os.environ, "DRY_RUN": "1", "TPU_NAME": "envtpu", "TPU_ZONE": "europe-west4-a"}
  out = subprocess.run([sys.executable, str(SCRIPT), "setup"], env=env, capture_output=True,
                       text=True, check=True).stdout
  assert out.splitlines() == [
      "gcloud compute tpus tpu-vm ssh envtpu --zone=europe-west4-a --worker=all "
      "'--command=python3 -m pip install -U pip && python3 -m pip install -U '\"'\"'jax[tpu]'\"'\"' "
      "&& python3 -m pip install -e ~/jaxft'"]


def test_pack_ships_tracked_and_untracked_files_not_ignored(tmp_path):
  (tmp_path / "pkg").mkdir()
  (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
  (tmp_path / "notes.md").write_text("hi\n")
  (tmp_path / "venv").mkdir()
  (tmp_path / "venv" / "big.bin").write_text("skip\n")
  (tmp_path / ".gitignore").write_text("venv/\n")
  subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
  files = tpu.repo_files(tmp_path)
  assert files == [".gitignore", "notes.md", "pkg/a.py"]
  import tarfile
  tar = tmp_path / "out.tar.gz"
  assert tpu.pack(tmp_path, str(tar)) == 3
  with tarfile.open(tar) as t:
    assert sorted(t.getnames()) == [".gitignore", "notes.md", "pkg/a.py"]


@pytest.mark.parametrize("kind,version", [("v4-8", "tpu-ubuntu2204-base"),
                                          ("v5litepod-4", "v2-alpha-tpuv5-lite"),
                                          ("v5p-128", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_default_versions(kind, version):
  assert tpu.default_version(kind) == version
