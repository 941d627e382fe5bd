"""Launchers, sweeps and scaling curves: the commands they build and the results they read back.

Shell scripts run for real with --dry-run (or with a fake Python that records its arguments);
the Slurm logic is checked against JAX's own Slurm detection; the collector reads workdirs
written by the trainer's own metrics writer.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import pathlib
import shlex
import subprocess
import sys
import time

import pytest

from codepmp_jax import cli, workdir
from launch import sweep
from launch.experiments import scaling_curve

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "configs/tiny.py"


def _sweep(argv: list[str]) -> int:
  """`python -m launch.sweep ARGV` in this process."""
  return cli.call(sweep.main, sweep.define_flags, argv)


def _curve(argv: list[str]) -> int:
  """`python -m launch.experiments.scaling_curve ARGV` in this process."""
  return cli.call(scaling_curve.main, scaling_curve.define_flags, argv)


def _bash(script: str, *args: str, env: dict | None = None, cwd: pathlib.Path = ROOT,
          check: bool = True) -> subprocess.CompletedProcess:
  base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_VISIBLE"))}
  result = subprocess.run(["bash", script, *args], cwd=cwd, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=60)
  if check and result.returncode != 0:
    raise AssertionError(f"{script} {args} exited {result.returncode}:\n{result.stderr}")
  return result


def _fake_bin(tmp_path: pathlib.Path, name: str, body: str) -> pathlib.Path:
  """A directory holding one executable `name` (a bash script), to put in front of PATH."""
  directory = tmp_path / f"bin_{name}"
  directory.mkdir(exist_ok=True)
  path = directory / name
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(0o755)
  return directory


# ---------------------------------------------------------------------------------------------
# tpu_vm.sh


TPU_ARGS = ("--dry-run", "--name=pmp1", "--type=v4-16", "--zone=us-central2-b",
            "--version=tpu-ubuntu2204-base", "--project=proj")
TRAIN = ("--config=configs/tiny.py", "--workdir=runs/pmp1", "--config.data.path=my data/it's")


def _gcloud_lines(stdout: str) -> list[list[str]]:
  return [shlex.split(line) for line in stdout.splitlines() if line.startswith("gcloud ")]


def test_tpu_vm_dry_run_prints_the_gcloud_commands_in_order():
  out = _bash("launch/tpu_vm.sh", *TPU_ARGS, "--", *TRAIN).stdout
  lines = _gcloud_lines(out)
  scope = ["--zone=us-central2-b", "--project=proj"]
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
  assert [line[4] for line in lines] == ["create", "scp", "ssh", "ssh", "ssh", "ssh", "delete"]
  create, scp, install, run, stream, wait, delete = lines
  assert create == tpu + ["create", "pmp1", *scope, "--accelerator-type=v4-16",
                          "--version=tpu-ubuntu2204-base"]
  assert scp[5:] == [scp[5], "pmp1:codepmp_src.tar.gz", *scope, "--worker=all"]
  assert scp[5].endswith("pmp1.tar.gz")
  for line in (install, run, wait):
    assert line[5:-1] == ["pmp1", *scope, "--worker=all"]
  assert stream[5:-1] == ["pmp1", *scope, "--worker=0"]
  assert delete == tpu + ["delete", "pmp1", *scope, "--quiet"]
  remote_install = install[-1].removeprefix("--command=")
  assert "python3 -m pip install -q -r requirements.txt 'jax[tpu]==0.10.2'" in remote_install
  assert "tar -xzf $HOME/codepmp_src.tar.gz" in remote_install
  # The archive step packs the checkout's files (tracked and untracked, not ignored).
  assert "git ls-files -co --exclude-standard -z | tar" in out.splitlines()[0]


def test_tpu_vm_remote_run_command_survives_two_shell_levels(tmp_path):
  """Runs the exact remote command that the dry run prints, with a fake python3 on the 'worker'."""
  out = _bash("launch/tpu_vm.sh", *TPU_ARGS, "--", *TRAIN).stdout
  _, _, _, run, _, wait, _ = _gcloud_lines(out)
  home = tmp_path / "home"
  (home / "codepmp_jax").mkdir(parents=True)
  fake = _fake_bin(tmp_path, "python3", 'printf "%s\\n" "$@" > "$HOME/args.txt"; exit 7\n')
  env = {"HOME": str(home), "PATH": f"{fake}:{os.environ['PATH']}"}
  subprocess.run(["bash", "-c", run[-1].removeprefix("--command=")], env=env, check=True, timeout=30)
  for _ in range(100):  # the run is detached (nohup ... &): wait for its status file
    if (home / "codepmp_train.rc").exists():
      break
    time.sleep(0.1)
  waited = subprocess.run(["bash", "-c", wait[-1].removeprefix("--command=")], env=env, timeout=30)
  assert waited.returncode == 7  # the worker's exit status comes back through the wait step
  args = (home / "args.txt").read_text().splitlines()
  assert args == ["-m", "codepmp_jax.train", *TRAIN, "--config.distributed.initialize=true"]
  assert (home / "codepmp_train.rc").read_text().strip() == "7"


def test_tpu_vm_keep_fetch_spot_setup_and_missing_arguments():
  out = _bash("launch/tpu_vm.sh", *TPU_ARGS, "--keep", "--spot", "--fetch=results",
              "--setup=cp -r /data/prepared .", "--python=python3.11", "--", *TRAIN).stdout
  lines = _gcloud_lines(out)
  assert lines[0][-1] == "--spot"
  assert lines[2][-1].endswith("&& cd $HOME/codepmp_jax && cp -r /data/prepared . && python3.11 -m pip "
                               "install -q -r requirements.txt 'jax[tpu]==0.10.2'")
  assert all(line[4] != "delete" for line in lines)
  assert lines[-1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse",
                       "pmp1:codepmp_jax/runs/pmp1", "results", "--zone=us-central2-b",
                       "--project=proj", "--worker=0"]
  missing = _bash("launch/tpu_vm.sh", "--dry-run", "--type=v4-8", "--", *TRAIN, check=False)
  assert missing.returncode == 2 and "missing --zone --version" in missing.stderr
  no_workdir = _bash("launch/tpu_vm.sh", *TPU_ARGS, "--", "--config=configs/tiny.py", check=False)
  assert no_workdir.returncode == 2 and "--workdir" in no_workdir.stderr


# ---------------------------------------------------------------------------------------------
# Slurm / multi-node environment logic


def _overrides(address: str, count: int, process: int) -> list[str]:
  return [f"--config.distributed.coordinator_address={address}",
          f"--config.distributed.num_processes={count}", f"--config.distributed.process_id={process}"]


@pytest.mark.parametrize("nodelist", ["node001", "node001,host2", "node[001-015],host2",
                                      "node[001,007-015],host2", "gpu-a[17-20]"])
@pytest.mark.parametrize("procid,ntasks", [(0, 2), (5, 16)])
def test_slurm_overrides_match_jax_slurm_detection(monkeypatch, nodelist, procid, ntasks):
  from jax._src.clusters.slurm_cluster import SlurmCluster

  env = {"SLURM_JOB_ID": "4711", "SLURM_STEP_NODELIST": nodelist, "SLURM_NTASKS": str(ntasks),
         "SLURM_PROCID": str(procid), "SLURM_LOCALID": "0", "PATH": "/usr/bin:/bin"}
  if any(pathlib.Path(d, "scontrol").exists() for d in ("/usr/bin", "/bin")):
    pytest.skip("a real scontrol is installed; this case checks the built-in parser")
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  assert SlurmCluster.is_env_present()
  expected = _overrides(SlurmCluster.get_coordinator_address(None, None),
                        SlurmCluster.get_process_count(), SlurmCluster.get_process_id())
  assert _bash("launch/distributed_env.sh", env=env).stdout.splitlines() == expected


def test_slurm_overrides_use_scontrol_job_nodelist_and_port(tmp_path):
  fake = _fake_bin(tmp_path, "scontrol",
                   '[[ "$1 $2 $3" == "show hostnames n[3-4]" ]] || exit 9; printf "n3\\nn4\\n"\n')
  env = {"SLURM_JOB_NODELIST": "n[3-4]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
         "COORDINATOR_PORT": "1234", "PATH": f"{fake}:/usr/bin:/bin"}
  assert _bash("launch/distributed_env.sh", env=env).stdout.splitlines() == _overrides("n3:1234", 2, 1)
  # A suffix after the brackets is part of the host name (as `scontrol show hostnames` has it).
  env = {"SLURM_JOB_NODELIST": "gpu[07-08]-ib,x", "SLURM_NTASKS": "4", "SLURM_PROCID": "3",
         "PATH": "/usr/bin:/bin"}
  assert _bash("launch/distributed_env.sh", env=env).stdout.splitlines() == _overrides(
      "gpu07-ib:12355", 4, 3)


def test_slurm_single_task_needs_no_overrides_and_missing_variables_fail():
  env = {"SLURM_JOB_NODELIST": "n1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "PATH": "/usr/bin:/bin"}
  assert _bash("launch/distributed_env.sh", env=env).stdout == ""
  result = _bash("launch/distributed_env.sh", env={"SLURM_NTASKS": "2"}, check=False)
  assert result.returncode != 0 and "SLURM_PROCID is not set" in result.stderr
  result = _bash("launch/distributed_env.sh", env={**env, "SLURM_NTASKS": "2", "SLURM_PROCID": "2"},
                 check=False)
  assert result.returncode != 0 and "not below the process count" in result.stderr


@pytest.mark.parametrize("per_node,visible,local,expected", [
    ("2", "4,5", "1", "5"),      # one process per GPU: each sees its own
    ("8", "", "3", "3"),         # nothing set yet: the local id
    ("2", "6", "1", "6"),        # srun --gpus-per-task already bound one GPU
    ("1", "0,1,2,3", "0", "0,1,2,3"),  # one process per node drives all its GPUs
])
def test_slurm_task_side_command_and_gpu_binding(per_node, visible, local, expected):
  env = {"SLURM_JOB_ID": "100", "SLURM_JOB_NODELIST": "g[1-4]", "SLURM_NTASKS": "8",
         "SLURM_PROCID": "7", "SLURM_LOCALID": local, "SLURM_NTASKS_PER_NODE": per_node,
         "CUDA_VISIBLE_DEVICES": visible, "PYTHON": "py", "PATH": "/usr/bin:/bin"}
  out = _bash("launch/gpu_slurm.sbatch", "--task", "--dry-run", *TRAIN, env=env).stdout.splitlines()
  assert out[0] == f"CUDA_VISIBLE_DEVICES={expected}"
  port = 100 % 4096 + 61440
  assert shlex.split(out[1]) == ["py", "-m", "codepmp_jax.train", *TRAIN,
                                 *_overrides(f"g1:{port}", 8, 7)]


def test_slurm_batch_side_runs_one_task_per_process_through_srun(tmp_path):
  out = _bash("launch/gpu_slurm.sbatch", "--dry-run", *TRAIN,
              env={"SLURM_SUBMIT_DIR": str(ROOT)}).stdout
  assert shlex.split(out) == ["srun", "--kill-on-bad-exit=1", "--label", "bash",
                              f"{ROOT}/launch/gpu_slurm.sbatch", "--task", *TRAIN]
  wrong = _bash("launch/gpu_slurm.sbatch", "--dry-run", *TRAIN, env={"CODEPMP_ROOT": str(tmp_path)},
                check=False)
  assert wrong.returncode == 2 and "not the repository root" in wrong.stderr


def test_multinode_per_gpu_process_ids_from_torchrun_style_env():
  env = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "NNODES": "2", "NODE_RANK": "1",
         "PYTHON": "py"}
  out = _bash("launch/gpu_multinode.sh", "--per_gpu", "--gpus_per_node=2", "--dry-run", "--",
              *TRAIN, env=env).stdout.splitlines()
  assert len(out) == 2
  for local, line in enumerate(out):
    words = shlex.split(line)
    assert words[0] == f"CUDA_VISIBLE_DEVICES={local}"
    assert words[1:] == ["py", "-m", "codepmp_jax.train", *TRAIN,
                         *_overrides("10.0.0.1:29500", 4, 2 + local)]
  explicit = _bash("launch/gpu_multinode.sh", "--coordinator=h:1", "--num_nodes=3", "--node_rank=2",
                   "--dry-run", "--", *TRAIN, env={"PYTHON": "py"}).stdout
  assert shlex.split(explicit)[1:] == ["py", "-m", "codepmp_jax.train", *TRAIN, *_overrides("h:1", 3, 2)]
  missing = _bash("launch/gpu_multinode.sh", "--num_nodes=2", "--", *TRAIN, check=False)
  assert missing.returncode == 2 and "--coordinator" in missing.stderr


def test_multinode_stops_the_other_processes_when_one_fails(tmp_path):
  fake = _fake_bin(tmp_path, "python", (
      'for a in "$@"; do case $a in *process_id=*) id=${a##*=} ;; esac; done\n'
      'if [[ "$id" == 1 ]]; then sleep 1; exit 3; fi\n'
      'sleep 20 &\n'
      'trap \'kill $!; echo "$id" >> "$MARKS"; exit 143\' TERM\n'
      'wait\n'))
  marks = tmp_path / "terminated.txt"
  start = time.perf_counter()
  result = _bash("launch/gpu_multinode.sh", "--per_gpu", "--gpus_per_node=3", "--", "--x",
                 env={"PYTHON": str(fake / "python"), "MARKS": str(marks)}, check=False)
  assert result.returncode == 3
  assert time.perf_counter() - start < 15
  assert sorted(marks.read_text().split()) == ["0", "2"]  # the others were stopped by SIGTERM
  assert "process" in result.stderr and "exited with 3" in result.stderr


# ---------------------------------------------------------------------------------------------
# sweep.py


def test_grid_expands_into_one_command_per_combination(capsys):
  code = _sweep(["--config=configs/tiny.py", "--root=runs/s", "--grid", "optimizer.lr=1e-6,3e-6",
                     "--grid", "loss.lm_coef=0,1", "--set", "train.total_steps=4", "--skip_check"])
  assert code == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == "# 4 runs of configs/tiny.py under runs/s"
  base = "python -m codepmp_jax.train --config=configs/tiny.py"
  assert lines[1:] == [
      f"{base} --workdir=runs/s/lr=1e-6_lm_coef=0 --config.train.total_steps=4 --config.optimizer.lr=1e-6 --config.loss.lm_coef=0",
      f"{base} --workdir=runs/s/lr=1e-6_lm_coef=1 --config.train.total_steps=4 --config.optimizer.lr=1e-6 --config.loss.lm_coef=1",
      f"{base} --workdir=runs/s/lr=3e-6_lm_coef=0 --config.train.total_steps=4 --config.optimizer.lr=3e-6 --config.loss.lm_coef=0",
      f"{base} --workdir=runs/s/lr=3e-6_lm_coef=1 --config.train.total_steps=4 --config.optimizer.lr=3e-6 --config.loss.lm_coef=1",
  ]


def test_python_sweeps_cross_their_axes_and_later_overrides_win():
  runs = sweep.product(sweep.fixed({"loss.lm_coef": 1, "mesh_shape": (1, -1, 1)}),
                       sweep.named({"rm_only": {"loss.lm_coef": 0}, "both": {}}),
                       sweep.sweep("optimizer.schedule", ["cosine", "wsd"]))
  assert [r.name for r in runs] == ["rm_only_schedule=cosine", "rm_only_schedule=wsd",
                                    "both_schedule=cosine", "both_schedule=wsd"]
  assert dict(runs[0].overrides) == {"loss.lm_coef": "0", "mesh_shape": "(1,-1,1)",
                                     "optimizer.schedule": "cosine"}
  assert dict(runs[3].overrides)["loss.lm_coef"] == "1"
  assert sweep.split_top_level("(1,-1,1),'a,b',[2,3]") == ["(1,-1,1)", "'a,b'", "[2,3]"]
  assert sweep.product(sweep.fixed({"seed": 1})) == [sweep.Run("run", (("seed", "1"),))]


@pytest.mark.parametrize("build,message", [
    (lambda: sweep.parse_grid("lr", "--grid"), "--grid: expected key=value"),
    (lambda: sweep.parse_grid("a.b=1,,2", "--grid"), "grid a.b has an empty value"),
    (lambda: sweep.named({"a/b": {"x": 1}}), "run name 'a/b'"),
    (lambda: sweep.fixed({"not a key": 1}), "'not a key' is not a dotted config key"),
    (lambda: sweep.sweep("x", [1, 1]), "sweep x: needs distinct values"),
    (lambda: sweep.product(sweep.named({"a": {"x": 1}}), sweep.named({"": {}})), "run name ''"),
])
def test_sweep_building_errors_name_what_is_wrong(build, message):
  with pytest.raises(sweep.SweepError, match=message):
    build()


def test_two_runs_sharing_a_workdir_is_an_error():
  with pytest.raises(sweep.SweepError, match="share the workdir"):
    sweep.product(sweep.named({"a": {"x": 1}}), sweep.fixed({"y": 2}) + sweep.fixed({"y": 3}))


@pytest.mark.parametrize("argv,message", [
    (["--config=configs/pmp_smollm2_135m.py", "--sweep=nope", "--root=r"],
     "has no sweep 'nope'; it has ['data_scale'"),
    (["--config=configs/tiny.py", "--root=r"], "nothing to sweep"),
    (["--root=r", "--grid=seed=1,2"], "--config is required"),
    (["--config=configs/tiny.py", "--grid=seed=1,2"], "--root is required"),
    (["--config=configs/tiny.py", "--root=r", "--grid=seed=1,2", "--run", "--emit=tpu"],
     "--print, --run and --emit exclude each other"),
    (["--config=configs/tiny.py", "--root=r", "--emit=gcp"], "value should be one of <slurm|tpu>"),
    (["colect", "--root=r"], "unexpected argument 'colect'"),
    (["collect"], "collect: --root is required"),
])
def test_sweep_usage_errors_are_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    _sweep(argv)
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
  assert message in err


def test_overrides_are_checked_the_way_the_trainer_parses_them(tmp_path):
  config = tmp_path / "c.py"
  config.write_text("import ml_collections\n\ndef get_config(arg=None):\n"
                    "  return ml_collections.ConfigDict(dict(opt=dict(lr=1.0), steps=0, keep=()))\n")
  good = [sweep.Run("a", (("opt.lr", "3e-6"), ("steps", "4"), ("keep", "(1,2)")))]
  sweep.check_overrides(str(config), good)
  with pytest.raises(sweep.SweepError, match=r"(?s)run b: .*Did you mean \"lr\""):
    sweep.check_overrides(str(config), [sweep.Run("b", (("opt.lrr", "1"),))])
  with pytest.raises(sweep.SweepError, match="run c: .*invalid literal for int"):
    sweep.check_overrides(str(config), [sweep.Run("c", (("steps", "1.5"),))])


def test_shipped_ablation_sweeps_are_valid_for_their_configs():
  expected = {"loss_components": 3, "loss_coefficients": 4, "pair_sources": 3, "schedule": 2,
              "data_scale": 5}
  config = str(ROOT / "configs/pmp_smollm2_135m.py")
  sweeps = sweep.config_sweeps(config)
  assert {name: len(runs) for name, runs in sweeps.items()} == expected
  for runs in sweeps.values():
    sweep.check_overrides(config, runs)
  loss = {r.name: dict(r.overrides) for r in sweeps["loss_components"]}
  assert loss["rm_only"]["loss.lm_coef"] == "0" and loss["lm_only"]["loss.rm_coef"] == "0"
  assert [dict(r.overrides)["optimizer.schedule"] for r in sweeps["schedule"]] == ["cosine", "wsd"]
  assert sweep.config_sweeps(str(ROOT / TINY)) == {}


def test_emit_commands_for_slurm_and_tpu(tmp_path, capsys):
  root = tmp_path / "sched"
  args = ["--config=configs/tiny.py", f"--root={root}", "--grid", "optimizer.schedule=cosine,wsd",
          "--skip_check"]
  assert _sweep([*args, "--emit=slurm", "--launcher_args=--nodes=4 --time=1:00:00"]) == 0
  slurm = [shlex.split(x) for x in capsys.readouterr().out.splitlines()[1:]]
  assert slurm[0] == ["sbatch", "--job-name=sched-schedule-cosine", "--nodes=4", "--time=1:00:00",
                      "launch/gpu_slurm.sbatch", "--config=configs/tiny.py",
                      f"--workdir={root}/schedule=cosine", "--config.optimizer.schedule=cosine"]
  assert _sweep([*args, "--emit=tpu", "--launcher_args=--type=v4-8 --zone=z --version=v"]) == 0
  tpu = [shlex.split(x) for x in capsys.readouterr().out.splitlines()[1:]]
  assert tpu[1] == ["launch/tpu_vm.sh", "--name=codepmp-sched-schedule-wsd", "--type=v4-8", "--zone=z",
                    "--version=v", "--", "--config=configs/tiny.py", f"--workdir={root}/schedule=wsd",
                    "--config.optimizer.schedule=wsd"]
  manifest = json.loads((root / "sweep.json").read_text())
  assert [r["name"] for r in manifest["runs"]] == ["schedule=cosine", "schedule=wsd"]
  name = sweep.launcher_command("tpu", "r", sweep.Run("X_" * 40, ()), [], [])[1].removeprefix("--name=")
  assert len(name) <= 63 and name.startswith("codepmp-r-x-x-") and name.replace("-", "").isalnum()


def _write_workdir(workdir: pathlib.Path, steps: list[int], total_steps: int, finish: bool,
                   lr: float) -> dict:
  """A workdir as the trainer leaves it: config.json, metrics.jsonl (its own writer), summary.json."""
  from codepmp_jax import metrics

  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(json.dumps({"train": {"total_steps": total_steps}}))
  last = {}
  with metrics.MetricWriter(workdir, total_steps) as writer:
    for step in steps:
      last = {"loss": 1.0 / step + lr, "accuracy": 0.5 + step / 100, "lr": lr,
              "eval/accuracy": 0.6 + step / 100}
      writer.write(step, last)
  if finish:
    (workdir / "summary.json").write_text(json.dumps({"step": steps[-1], **last}, indent=2))
  return last


def test_collector_reads_finished_stopped_incomplete_and_missing_workdirs(tmp_path, capsys):
  root = tmp_path / "sweep"
  runs = [sweep.Run(f"lr={lr}", (("optimizer.lr", str(lr)), ("train.total_steps", "4")))
          for lr in (1, 2, 3, 4)]
  sweep.write_manifest(root, TINY, runs)
  done = _write_workdir(root / "lr=1", [2, 4], 4, finish=True, lr=1.0)
  _write_workdir(root / "lr=2", [2], 4, finish=True, lr=2.0)           # preempted at step 2
  running = _write_workdir(root / "lr=3", [2, 4], 4, finish=False, lr=3.0)
  with (root / "lr=3" / "metrics.jsonl").open("a") as f:
    f.write('{"step": 6, "loss"')                                         # torn by a kill
  assert _sweep(["collect", f"--root={root}"]) == 0
  out = capsys.readouterr().out
  rows = list(csv.DictReader(io.StringIO((root / "results.csv").read_text())))
  assert [(r["run"], r["status"], r["step"], r["optimizer.lr"]) for r in rows] == [
      ("lr=1", "finished", "4", "1"), ("lr=2", "stopped", "2", "2"),
      ("lr=3", "incomplete", "4", "3"), ("lr=4", "not started", "", "4")]
  assert float(rows[0]["eval/accuracy"]) == done["eval/accuracy"]
  assert float(rows[2]["loss"]) == running["loss"]
  assert "train.total_steps" not in rows[0]  # the same in every run: not a column
  md = (root / "results.md").read_text().splitlines()
  assert md[0] == "| run | status | step | optimizer.lr | eval/accuracy | loss | accuracy |"
  assert md[2] == "| lr=1 | finished | 4 | 1 | 0.64 | 1.25 | 0.54 |"
  assert out.startswith(md[0]) and "4 runs (1 finished, 1 stopped, 1 incomplete, 1 not started)" in out
  assert not workdir.is_finished(root / "lr=2") and workdir.is_finished(root / "lr=1")
  (root / "lr=2" / "summary.json").write_text(json.dumps({"step": 2, "finished": True}))
  assert workdir.is_finished(root / "lr=2")  # the trainer's own word wins


def test_collector_without_manifest_and_broken_lines(tmp_path):
  _write_workdir(tmp_path / "a", [1], 1, finish=True, lr=0.5)
  (tmp_path / "not_a_run").mkdir()
  results, overrides = sweep.collect(tmp_path)
  assert [r.name for r in results] == ["a"] and overrides == {"a": {}}
  bad = tmp_path / "b"
  bad.mkdir()
  (bad / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(sweep.SweepError, match=r"b/metrics.jsonl:2: not JSON"):
    sweep.read_result(bad)


def test_run_locally_skips_finished_workdirs_and_stops_on_failure(tmp_path):
  fake = _fake_bin(tmp_path, "python", (
      'for a in "$@"; do case $a in --workdir=*) w=${a#*=} ;; esac; done\n'
      'echo ran >> "$w.log"\n'
      'if [[ "$*" == *fail* ]]; then exit 1; fi\n'
      'mkdir -p "$w" && echo \'{"step": 4, "loss": 0.5}\' > "$w/summary.json"\n')) / "python"
  root = tmp_path / "r"
  root.mkdir()
  runs = sweep.sweep("loss.lm_coef", ["0", "1", "fail", "3"])
  assert sweep.run_all(str(fake), TINY, str(root), runs, [], keep_going=False) == 1
  assert [(root / f"lm_coef={v}.log").exists() for v in ("0", "1", "fail", "3")] == [True, True, True, False]
  assert sweep.run_all(str(fake), TINY, str(root), runs, [], keep_going=True) == 1
  logs = {v: (root / f"lm_coef={v}.log").read_text().count("ran") for v in ("0", "1", "fail", "3")}
  assert logs == {"0": 1, "1": 1, "fail": 2, "3": 1}  # finished ones were skipped the second time


# The smallest real training run: synthetic pairs, a one-layer model (flags as in test_train.py).
REAL_SMALL = [
    "--config.data.builtin.name=", "--config.data.source=synthetic", "--config.data.vocab_size=256",
    "--config.data.synthetic_pairs=512", "--config.model.vocab_size=320",
    "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
    "--config.model.num_layers=1", "--config.train.global_batch=8", "--config.train.seq_len=32",
    "--config.train.log_every=2", "--config.train.eval_every=0", "--config.mesh_shape=(-1,1,1)",
]


@pytest.mark.rehearse  # the suite's one experiment smoke run is the demo's (test_experiments.py)
def test_real_data_scale_sweep_then_scaling_curve_on_the_tiny_config(tmp_path, monkeypatch, capsys):
  """A two-point PMP sweep (2 and 4 steps) runs, resumes and is collected; an RM is fine-tuned from
  its larger point and put on the curve (three real trainer runs, one CPU device each)."""
  from codepmp_jax.data.tokenizer import train_sentencepiece

  # A tokenizer, so that a run's workdir can be the `init_from` of the next.
  train_sentencepiece(["def add(a, b):\n  return a + b\n", "Instruction: add\n\nResponse:"] * 20, 300,
                      tmp_path / "spm")
  small = [*REAL_SMALL, f"--config.tokenizer={tmp_path / 'spm.model'}"]
  monkeypatch.chdir(ROOT)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  root = tmp_path / "scale"
  args = [f"--config={TINY}", f"--root={root}", "--grid", "train.total_steps=2,4", "--run", "--", *small]
  assert _sweep(args) == 0
  assert _sweep(args) == 0  # everything finished: both runs are skipped
  assert capsys.readouterr().out.count("finished before, skipped") == 2
  assert _sweep(["collect", f"--root={root}"]) == 0
  rows = list(csv.DictReader(io.StringIO((root / "results.csv").read_text())))
  assert [(r["run"], r["status"], r["step"], r["train.total_steps"]) for r in rows] == [
      ("total_steps=2", "finished", "2", "2"), ("total_steps=4", "finished", "4", "4")]
  for row in rows:
    summary = json.loads((root / row["run"] / "summary.json").read_text())
    assert (float(row["loss"]), float(row["accuracy"])) == (summary["loss"], summary["accuracy"])
  assert (root / "results.md").read_text().splitlines()[0] == (
      "| run | status | step | train.total_steps | loss | accuracy |")

  curve = tmp_path / "curve"
  assert _curve([
      "finetune", f"--checkpoints={root}/total_steps=4", f"--config={TINY}", f"--root={curve}",
      "--set", "train.total_steps=2", "--set", "loss.lm_coef=0", "--run", "--", *small,
      "--config.train.eval_every=2", "--config.train.eval_batch=8", "--config.train.eval_batches=1"]) == 0
  points = list(csv.DictReader(io.StringIO((curve / "curve.csv").read_text())))
  assert [(p["run"], int(p["pairs"])) for p in points] == [("total_steps=4", 4 * 8)]
  summary = json.loads((curve / "total_steps=4" / "summary.json").read_text())
  assert float(points[0]["accuracy"]) == summary["eval/accuracy"] and summary["step"] == 2
  config = json.loads((curve / "total_steps=4" / "config.json").read_text())
  assert config["init_from"] == str(root / "total_steps=4") and config["loss"]["lm_coef"] == 0
  assert (curve / "curve.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------
# scaling_curve.py


def test_geometric_steps_by_sqrt2_and_the_keep_steps_flag(tmp_path):
  assert scaling_curve.geometric_steps(1000, 16000) == [1000, 1414, 2000, 2828, 4000, 5657, 8000,
                                                        11314, 16000]
  assert scaling_curve.geometric_steps(1, 10) == [1, 2, 3, 4, 6, 8]  # 1.41 rounds onto 1: once
  assert scaling_curve.geometric_steps(100, 399, factor=2.0) == [100, 200]
  steps = scaling_curve.geometric_steps(2, 12)
  assert all(b / a <= 2 for a, b in zip(steps, steps[1:]))
  for bad in ((0, 5), (5, 4)):
    with pytest.raises(ValueError):
      scaling_curve.geometric_steps(*bad)
  flag = scaling_curve.keep_steps_override(steps)
  assert flag == "--config.checkpoint.keep_steps=(2,3,4,6,8,11,)"
  from absl import flags
  from ml_collections import config_flags

  argv = ["x", f"--config={ROOT / TINY}", flag]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  assert tuple(values.config.checkpoint.keep_steps) == tuple(steps)


def _decayed(tmp_path: pathlib.Path, name: str, step: int, batch: int) -> pathlib.Path:
  path = tmp_path / "decays" / name
  path.mkdir(parents=True)
  (path / "summary.json").write_text(json.dumps({"step": step}))
  (path / "config.json").write_text(json.dumps({"train": {"global_batch": batch}}))
  return path


def test_finetune_commands_for_decayed_checkpoints(tmp_path, capsys):
  for step in (200, 100, 141):
    _decayed(tmp_path, f"decay_{step}", step + 10, 32)
  other = tmp_path / "ckpt"
  other.mkdir()
  code = _curve([
      "finetune", f"--checkpoints={tmp_path}/decays/*,{other}@999", "--config=configs/tiny.py",
      f"--root={tmp_path}/ft", "--baseline=scratch", "--eval=pairwise", "--eval_data=d.jsonl",
      "--eval_format=gsm8k", "--set", "train.total_steps=3", "--skip_check", "--", "--config.seed=1"])
  assert code == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].endswith("(pairs: baseline=0, ckpt=999, decay_100=3520, decay_141=4832, decay_200=6720)")
  train = [shlex.split(x) for x in lines[1::2]]
  evals = [shlex.split(x) for x in lines[2::2]]
  assert train[0] == ["python", "-m", "codepmp_jax.train", "--config=configs/tiny.py",
                      f"--workdir={tmp_path}/ft/baseline", "--config.train.total_steps=3",
                      "--config.init_from=", "--config.seed=1"]
  assert train[2][5:7] == ["--config.train.total_steps=3", f"--config.init_from={tmp_path}/decays/decay_100"]
  assert evals[2] == ["python", "-m", "codepmp_jax.eval", "pairwise",
                      f"--checkpoint={tmp_path}/ft/decay_100", "--data=d.jsonl", "--format=gsm8k",
                      f"--out={tmp_path}/ft/decay_100/eval.json"]
  with pytest.raises(sweep.SweepError, match="no summary.json or config.json"):
    scaling_curve.resolve_points([str(other)])


def test_plot_reads_reports_and_summaries_into_table_and_png(tmp_path, capsys):
  root = tmp_path / "curve"
  points = [scaling_curve.Point("baseline", "", 0), scaling_curve.Point("d1", "c/d1", 1000),
            scaling_curve.Point("d2", "c/d2", 2000)]
  root.mkdir()
  (root / "curve.json").write_text(json.dumps({"points": [vars(p) for p in points]}))
  for point, acc in zip(points, (0.55, 0.6, 0.7)):
    (root / point.name).mkdir()
    (root / point.name / "eval.json").write_text(json.dumps(
        {"mode": "pairwise", "accuracy": acc, "ci95": [acc - 0.05, acc + 0.05]}))
  assert _curve(["plot", f"--root={root}"]) == 0
  rows = list(csv.DictReader(io.StringIO((root / "curve.csv").read_text())))
  assert [(r["run"], int(r["pairs"]), float(r["accuracy"])) for r in rows] == [
      ("baseline", 0, 0.55), ("d1", 1000, 0.6), ("d2", 2000, 0.7)]
  assert rows[0]["checkpoint"] == "scratch"
  png = (root / "curve.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
  assert "| d2 | 2000 | 0.7 | 0.65 | 0.75 | c/d2 | eval.json (pairwise) |" in capsys.readouterr().out
  # Without an eval report the fine-tune's own final eval/accuracy is used, if it finished.
  (root / "d2" / "eval.json").unlink()
  _write_workdir(root / "d2", [3], 3, finish=True, lr=0.0)
  rows = scaling_curve.curve_rows(root)
  assert rows[2]["accuracy"] == pytest.approx(0.63) and rows[2]["ci95_low"] is None
  assert math.isclose(rows[1]["ci95_high"], 0.65)


@pytest.mark.parametrize("argv,message", [
    (["step", "--first=1", "--last=2"],
     "expected a command, steps|finetune|plot, as the first argument; got ['step'] (--help for usage)"),
    (["steps", "--first=1"], "steps: --last is required"),
    (["plot", "--root=r", "--", "--x"], "plot: unexpected arguments ['--x']"),
    (["finetune", "--checkpoints=c", "--root=r"], "finetune: --config is required"),
])
def test_scaling_curve_usage_errors_are_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    _curve(argv)
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and err == f"error: {message}\n"


@pytest.mark.slow
def test_cli_entry_points_run_as_modules_and_scripts():
  sweeps = ["--config=configs/pmp_smollm2_135m.py", "--list"]
  for command in (["-m", "launch.sweep", *sweeps], ["launch/sweep.py", *sweeps],
                  ["-m", "launch.experiments.scaling_curve", "steps", "--first=4", "--last=8"],
                  ["launch/experiments/scaling_curve.py", "steps", "--first=4", "--last=8"]):
    result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout
  assert "4 6 8" in result.stdout


def test_tpu_vm_defaults_to_a_gs_workdir_with_a_bucket():
  out = _bash("launch/tpu_vm.sh", *TPU_ARGS, "--bucket=gs://bkt", "--name=pod1", "--",
              "--config=configs/tiny.py").stdout
  assert "--workdir=gs://bkt/runs/pod1" in out
