"""Cloud TPU VMs and pod slices for jaxft: create, sync the code, install, launch on every worker,
collect workdirs, delete. Every action is a `gcloud compute tpus tpu-vm ...` command; with
`--dry-run` (or DRY_RUN=1 in the environment) the commands are printed, one per line, instead of run.

    python tpu/tpu.py create  --name ft --zone us-central2-b --type v4-32
    python tpu/tpu.py sync    --name ft --zone us-central2-b        # code -> ~/jaxft on all workers
    python tpu/tpu.py setup   --name ft --zone us-central2-b        # jax[tpu] + pip install -e ~/jaxft
    python tpu/tpu.py launch  --name ft --zone us-central2-b -- \\
        train --config experiments/glue_small.py:sst2 --workdir ~/runs/sst2
    python tpu/tpu.py collect --name ft --zone us-central2-b --workdir ~/runs/sst2 --dest runs/
    python tpu/tpu.py delete  --name ft --zone us-central2-b
    python tpu/tpu.py up ...   # create + sync + setup in one go

Accelerator types: v4-N (N TensorCores, 8 per host), v5litepod-N (v5e, N chips), v5p-N, v6e-N.
The software version defaults to Google's recommendation for JAX on that generation
(tpu-ubuntu2204-base for v4, v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e
for v6e); pass --version to override.

`launch` runs the same `python3 -m jaxft <args>` on all workers at once (`--worker=all`) with
JAXFT_MULTIHOST=1, so `jaxft.train.distributed.initialize()` calls jax.distributed.initialize() and
the processes of a pod slice form one job (one global mesh over every chip). Use a workdir that every
worker can write or that only process 0 writes; `collect` copies it back from the chosen workers.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tarfile

REMOTE_DIR = "~/jaxft"
REMOTE_TAR = "~/jaxft.tar.gz"
DEFAULT_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
                    "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
_TYPE = re.compile(r"^(v4|v5litepod|v5p|v6e)-(\d+)$")
_SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", "venv", ".venv", "jaxft.egg-info"}


def default_version(accelerator_type: str) -> str:
  """The recommended JAX software version for an accelerator type, e.g. 'v4-32' -> tpu-ubuntu2204-base."""
  m = _TYPE.match(accelerator_type)
  if not m:
    hint = ""
    if accelerator_type.startswith("v5e-"):
      hint = f" (v5e slices are called v5litepod-N: try v5litepod-{accelerator_type[4:]})"
    raise ValueError(f"unknown TPU accelerator type {accelerator_type!r}{hint}; expected one of "
                     "v4-N, v5litepod-N, v5p-N, v6e-N, e.g. v4-8, v4-32, v5litepod-16, v5p-8")
  return DEFAULT_VERSIONS[m.group(1)]


def _common(args) -> list[str]:
  flags = [f"--zone={args.zone}"]
  if args.project:
    flags.append(f"--project={args.project}")
  return flags


def ssh_all(args, remote_command: str) -> list[str]:
  """gcloud ... ssh NAME --zone=Z --worker=all --command=CMD: one command on every worker."""
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_common(args), "--worker=all",
          f"--command={remote_command}"]


def create_commands(args) -> list[list[str]]:
  version = args.version or default_version(args.type)
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_common(args),
         f"--accelerator-type={args.type}", f"--version={version}"]
  if args.spot:
    cmd.append("--spot")
  return [cmd]


def sync_commands(args, tar_path: str) -> list[list[str]]:
  copy = ["gcloud", "compute", "tpus", "tpu-vm", "scp", tar_path, f"{args.name}:{REMOTE_TAR}",
          *_common(args), "--worker=all"]
  unpack = ssh_all(args, f"mkdir -p {REMOTE_DIR} && tar xzf {REMOTE_TAR} -C {REMOTE_DIR}")
  return [copy, unpack]


def setup_commands(args) -> list[list[str]]:
  install = (f"python3 -m pip install -U pip && python3 -m pip install -U 'jax[tpu]' && "
             f"python3 -m pip install -e {REMOTE_DIR}")
  return [ssh_all(args, install)]


def remote_join(words: list[str]) -> str:
  """shlex.join, but a leading '~/' stays unquoted so the workers' shell expands it to their home."""
  return " ".join("~/" + shlex.quote(w[2:]) if w.startswith("~/") else shlex.quote(w) for w in words)


def launch_commands(args) -> list[list[str]]:
  if not args.jaxft_args:
    raise ValueError("launch needs the jaxft command after '--', e.g. "
                     "launch --name ft --zone Z -- train --config experiments/quickstart.py "
                     "--workdir ~/runs/quick")
  jaxft_args = args.jaxft_args[1:] if args.jaxft_args[0] == "--" else args.jaxft_args
  run = f"cd {REMOTE_DIR} && JAXFT_MULTIHOST=1 python3 -m jaxft {remote_join(jaxft_args)}"
  if args.background:
    run = f"nohup sh -c {shlex.quote(run)} > ~/jaxft-launch.log 2>&1 &"
  return [ssh_all(args, run)]


def collect_commands(args) -> list[list[str]]:
  workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
  out = []
  for w in workers:
    dest = str(pathlib.Path(args.dest) / f"worker_{w}")
    out.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse",
                f"{args.name}:{args.workdir}", dest, *_common(args), f"--worker={w}"])
  return out


def delete_commands(args) -> list[list[str]]:
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_common(args), "--quiet"]]


def repo_files(root: pathlib.Path) -> list[str]:
  """Files to ship: git-tracked plus untracked-but-not-ignored, else a walk skipping venvs/caches."""
  try:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, capture_output=True, check=True)
    files = [f for f in out.stdout.decode().split("\0") if f]
    return sorted(f for f in files if (root / f).is_file())
  except (OSError, subprocess.CalledProcessError):
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
      rel = pathlib.Path(dirpath).relative_to(root)
      files.extend(str(rel / f) for f in filenames if not f.endswith(".pyc"))
    return sorted(files)


def pack(root: pathlib.Path, tar_path: str) -> int:
  files = repo_files(root)
  with tarfile.open(tar_path, "w:gz") as tar:
    for f in files:
      tar.add(root / f, arcname=f)
  return len(files)


def execute(commands: list[list[str]], dry_run: bool) -> int:
  for cmd in commands:
    print(shlex.join(cmd), flush=True)
    if dry_run:
      continue
    rc = subprocess.run(cmd).returncode
    if rc:
      print(f"tpu.py: command failed with exit status {rc}: {shlex.join(cmd)}", file=sys.stderr)
      return rc
  return 0


def _sync(args, dry_run: bool) -> int:
  root = pathlib.Path(args.src).resolve()
  tar_path = f"/tmp/jaxft-{args.name}.tar.gz"
  if dry_run:
    print(f"# pack {root} (git-tracked and untracked, non-ignored files) -> {tar_path}")
  else:
    n = pack(root, tar_path)
    print(f"# packed {n} files from {root} -> {tar_path}")
  return execute(sync_commands(args, tar_path), dry_run)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="tpu.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run nothing")
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--name", default=os.environ.get("TPU_NAME"), required="TPU_NAME" not in os.environ,
                      help="TPU VM / slice name (default: $TPU_NAME)")
  common.add_argument("--zone", default=os.environ.get("TPU_ZONE"), required="TPU_ZONE" not in os.environ,
                      help="zone, e.g. us-central2-b (v4), us-west4-a (v5e) (default: $TPU_ZONE)")
  common.add_argument("--project", default=os.environ.get("TPU_PROJECT", ""),
                      help="GCP project (default: $TPU_PROJECT, else gcloud's configured one)")
  sub = p.add_subparsers(dest="action", required=True)
  for name in ("create", "up"):
    c = sub.add_parser(name, parents=[common], help="create the TPU VM / pod slice" +
                       (", then sync and setup" if name == "up" else ""))
    c.add_argument("--type", required=True, help="accelerator type: v4-8, v4-32, v5litepod-16, v5p-8, ...")
    c.add_argument("--version", default="", help="software version (default: per generation)")
    c.add_argument("--spot", action="store_true", help="a Spot (preemptible) slice")
    c.add_argument("--src", default=str(pathlib.Path(__file__).resolve().parents[1]))
  s = sub.add_parser("sync", parents=[common], help="copy the code to ~/jaxft on all workers")
  s.add_argument("--src", default=str(pathlib.Path(__file__).resolve().parents[1]))
  sub.add_parser("setup", parents=[common], help="install jax[tpu] and jaxft on all workers")
  la = sub.add_parser("launch", parents=[common], help="run `python3 -m jaxft ARGS` on all workers")
  la.add_argument("--background", action="store_true",
                  help="detach (nohup, log in ~/jaxft-launch.log on each worker)")
  la.add_argument("jaxft_args", nargs=argparse.REMAINDER, help="after '--': the jaxft arguments")
  co = sub.add_parser("collect", parents=[common], help="copy a workdir back from workers")
  co.add_argument("--workdir", required=True, help="the workdir on the workers")
  co.add_argument("--dest", required=True, help="local folder; worker w goes to DEST/worker_w")
  co.add_argument("--workers", default="0", help="comma-separated worker ids (default 0)")
  sub.add_parser("delete", parents=[common], help="delete the TPU VM / slice")
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  dry_run = args.dry_run or os.environ.get("DRY_RUN", "") not in ("", "0")
  try:
    if args.action == "create":
      return execute(create_commands(args), dry_run)
    if args.action == "up":
      return (execute(create_commands(args), dry_run) or _sync(args, dry_run)
              or execute(setup_commands(args), dry_run))
    if args.action == "sync":
      return _sync(args, dry_run)
    if args.action == "setup":
      return execute(setup_commands(args), dry_run)
    if args.action == "launch":
      return execute(launch_commands(args), dry_run)
    if args.action == "collect":
      if not dry_run:
        pathlib.Path(args.dest).mkdir(parents=True, exist_ok=True)
      return execute(collect_commands(args), dry_run)
    return execute(delete_commands(args), dry_run)
  except ValueError as e:
    print(f"tpu.py {args.action}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
