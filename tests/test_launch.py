"""Launchers: each target's dry run is parsed as the bash script it is (commands, here-document
files, #SBATCH directives, the JobSet YAML) and checked for what the target needs; the
environment a launcher gives its workers is fed back through ``distributed.resolve``, the
function every worker uses to join the run. Nothing here starts a process on a cloud."""

import shlex
import sys
import time

import pytest
import yaml

from t5x_like import cli, distributed
from t5x_like.errors import UserError
from t5x_like.launch import ROOT, Command, File, Plan, execute, local

TRAIN = [
    "train",
    "--config",
    "configs/t5_span_corruption.py:base",
    "--workdir",
    "/mnt/shared/runs/t5_base",
    "--config.train.num_steps=100",
]
WORKER = ["t5x-like", *TRAIN]


def _dry_run(capsys, *argv):
    code = cli.main(["launch", *argv, "--dry-run", "--", *TRAIN])
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def parse_script(text: str) -> tuple[list[list[str]], dict[str, str]]:
    """(command lines as argv lists, {path: contents} of the ``cat > PATH <<'EOF'`` files)."""
    commands, files = [], {}
    lines = iter(text.splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#") or line == "set -euo pipefail":
            continue
        if line.startswith("cat > ") and line.endswith("<<'EOF'"):
            path = shlex.split(line)[2]
            body = []
            for inner in lines:
                if inner == "EOF":
                    break
                body.append(inner)
            files[path] = "\n".join(body) + "\n"
            continue
        argv = shlex.split(line, comments=True)
        if argv[-3:] == ["&", "pids+=($!)"] or argv[-1:] == ["&"]:
            argv = argv[: argv.index("&")]
        commands.append(argv)
    return commands, files


def _find(commands, *prefix):
    found = [c for c in commands if c[: len(prefix)] == list(prefix)]
    assert found, f"no command starts with {prefix}: {commands}"
    return found


def _flag(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"{name}=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def _remote_worker_command(ssh_argv):
    """The t5x-like argv inside ``--command=...`` and the variables set before it."""
    remote = shlex.split(_flag(ssh_argv, "--command").replace(";", " ; ").replace("&&", " && "))
    start = remote.index("t5x-like")
    end = remote.index("2>&1") if "2>&1" in remote else len(remote)
    return remote[start:end], remote[:start]


# --------------------------------------------------------------------------- Cloud TPU VM


def test_tpu_vm_creates_installs_trains_on_all_workers_and_deletes(capsys):
    out = _dry_run(
        capsys,
        "tpu-vm",
        "--name=t5-v5e",
        "--project=my-project",
        "--zone=us-west4-a",
        "--accelerator-type=v5litepod-16",
    )
    commands, _ = parse_script(out)
    (create,) = _find(commands, "gcloud", "compute", "tpus", "tpu-vm", "create", "t5-v5e")
    assert _flag(create, "--accelerator-type") == "v5litepod-16"
    assert _flag(create, "--version") == "v2-alpha-tpuv5-lite"
    assert _flag(create, "--zone") == "us-west4-a" and _flag(create, "--project") == "my-project"

    (tar,) = _find(commands, "tar", "czf")
    tarball, packed = tar[2], tar[tar.index(str(ROOT)) + 1 :]
    packed = [p for p in packed if not p.startswith("--")]
    assert all((ROOT / p).exists() for p in packed) and "t5x_like" in packed
    (scp,) = _find(commands, "gcloud", "compute", "tpus", "tpu-vm", "scp", tarball)
    assert "--worker=all" in scp

    ssh = _find(commands, "gcloud", "compute", "tpus", "tpu-vm", "ssh", "t5-v5e")
    assert all("--worker=all" in c for c in ssh)
    install, run = ssh
    assert "pip install" in _flag(install, "--command")
    worker, assigned = _remote_worker_command(run)
    assert worker == WORKER
    assert "T5X_LIKE_DISTRIBUTED=auto" in assigned

    delete = _find(commands, "gcloud", "compute", "tpus", "tpu-vm", "delete", "t5-v5e")
    assert commands.index(create) < commands.index(run) < commands.index(delete[0])
    assert commands[-1] == delete[0] and "--quiet" in delete[0]


def test_tpu_vm_multislice_is_a_queued_resource_with_one_ssh_per_slice(capsys):
    out = _dry_run(
        capsys,
        "tpu-vm",
        "--name=big",
        "--project=p",
        "--zone=us-east5-b",
        "--accelerator-type=v6e-16",
        "--num-slices=2",
        "--spot",
    )
    commands, _ = parse_script(out)
    (create,) = _find(commands, "gcloud", "compute", "tpus", "queued-resources", "create", "big")
    assert create[create.index("--node-count") + 1] == "2"
    assert create[create.index("--node-prefix") + 1] == "big"
    assert _flag(create, "--runtime-version") == "v2-alpha-tpuv6e" and "--spot" in create
    runs = [
        c for c in _find(commands, "gcloud", "compute", "tpus", "tpu-vm", "ssh")
        if "t5x-like" in _flag(c, "--command")
    ]
    assert sorted(c[5] for c in runs) == ["big-0", "big-1"]
    assert all(_remote_worker_command(c)[0] == WORKER for c in runs)
    # the two slices' trainers run at the same time: both lines are backgrounded
    assert sum(line.endswith("& pids+=($!)") and "t5x-like train" in line
               for line in out.splitlines()) == 2
    (delete,) = _find(commands, "gcloud", "compute", "tpus", "queued-resources", "delete", "big")
    assert "--force" in delete and commands[-1] == delete


# --------------------------------------------------------------------------- GKE


def _jobset(capsys, *argv):
    out = _dry_run(capsys, "gke", "--name=t5", "--image=us-docker.pkg.dev/p/r/t5x:1", *argv)
    commands, files = parse_script(out)
    (path,) = files
    (apply,) = _find(commands, "kubectl", "apply")
    assert apply == ["kubectl", "apply", "-f", path]
    (logs,) = _find(commands, "kubectl", "logs", "--follow")
    (delete,) = _find(commands, "kubectl", "delete", "jobset", "t5")
    assert commands.index(apply) < commands.index(logs) < commands.index(delete)
    jobset = yaml.safe_load(files[path])
    assert jobset["kind"] == "JobSet" and jobset["metadata"]["name"] == "t5"
    (rjob,) = jobset["spec"]["replicatedJobs"]
    pod = rjob["template"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == WORKER
    assert container["image"] == "us-docker.pkg.dev/p/r/t5x:1"
    return rjob, pod, container


@pytest.mark.parametrize(
    "tpu, topology, slices, hosts, chips, label",
    [
        ("v5e", "4x4", 1, 4, 4, "tpu-v5-lite-podslice"),  # 16 chips, 4 per host
        ("v5e", "2x4", 1, 1, 8, "tpu-v5-lite-podslice"),  # one 8-chip host
        ("v5p", "2x2x4", 2, 4, 4, "tpu-v5p-slice"),
        ("v6e", "8x8", 3, 16, 4, "tpu-v6e-slice"),
    ],
)
def test_gke_tpu_jobset(capsys, tpu, topology, slices, hosts, chips, label):
    rjob, pod, container = _jobset(
        capsys, f"--tpu={tpu}", f"--topology={topology}", f"--num-slices={slices}"
    )
    assert rjob["replicas"] == slices
    spec = rjob["template"]["spec"]
    assert spec["parallelism"] == spec["completions"] == hosts
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": label,
        "cloud.google.com/gke-tpu-topology": topology,
    }
    assert container["resources"]["limits"] == {"google.com/tpu": chips}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["T5X_LIKE_DISTRIBUTED"] == "auto"
    assert distributed.resolve(env={"T5X_LIKE_DISTRIBUTED": "auto"}).mode == "auto"
    assert ("MEGASCALE_NUM_SLICES" in env) == (slices > 1)
    if slices > 1:
        assert env["MEGASCALE_NUM_SLICES"] == str(slices)
        # the coordinator is pod 0 of slice 0: <jobset>-<replicated job>-0-0.<jobset>
        assert env["MEGASCALE_COORDINATOR_ADDRESS"] == f"t5-{rjob['name']}-0-0.t5"


def test_gke_gpu_jobset_gives_each_pod_an_explicit_coordinator(capsys):
    rjob, pod, container = _jobset(capsys, "--gpu=nvidia-h100-80gb", "--nodes=3")
    assert rjob["replicas"] == 1
    assert rjob["template"]["spec"]["parallelism"] == 3
    assert rjob["template"]["spec"]["completionMode"] == "Indexed"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    env = {e["name"]: e for e in container["env"]}
    assert env["T5X_LIKE_COORDINATOR"]["value"] == f"t5-{rjob['name']}-0-0.t5:1234"
    index_path = env["T5X_LIKE_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index_path == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # What a worker does with it: pod 2 of 3 joins at pod 0's address.
    values = {k: e.get("value") for k, e in env.items()} | {"T5X_LIKE_PROCESS_ID": "2"}
    cluster = distributed.resolve(env=values)
    assert (cluster.mode, cluster.num_processes, cluster.process_id) == ("explicit", 3, 2)
    assert cluster.coordinator == "t5-workers-0-0.t5:1234"


# --------------------------------------------------------------------------- SLURM


def _sbatch(capsys, *argv):
    commands, files = parse_script(_dry_run(capsys, "slurm", "--name=t5b", *argv))
    (path,) = files
    assert commands == [["sbatch", path]]
    lines = files[path].splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = dict(
        shlex.split(line)[1].removeprefix("--").split("=", 1)
        for line in lines
        if line.startswith("#SBATCH")
    )
    (srun,) = [shlex.split(line) for line in lines if line.startswith("srun")]
    assert srun[srun.index("t5x-like") :] == WORKER
    assert "export T5X_LIKE_DISTRIBUTED=auto" in lines
    return directives, lines


def test_slurm_one_process_per_gpu(capsys):
    directives, lines = _sbatch(
        capsys, "--nodes=4", "--gpus-per-node=8", "--partition=a3", "--setup=module load cuda"
    )
    assert directives["nodes"] == "4"
    assert directives["gpus-per-node"] == "8" and directives["ntasks-per-node"] == "8"
    assert directives["partition"] == "a3" and directives["job-name"] == "t5b"
    assert lines.index("module load cuda") < next(
        i for i, line in enumerate(lines) if line.startswith("srun")
    )
    # Inside the step, SLURM's variables alone make every task join the run.
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NODELIST": "gpu[01-04]", "SLURM_NTASKS": "32",
             "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}
    assert distributed.resolve(env=slurm).mode == "auto"
    assert distributed.resolve(env={**slurm, "SLURM_NTASKS": "1"}).mode == "single"


def test_slurm_one_process_per_node_sees_all_its_gpus(capsys):
    directives, lines = _sbatch(capsys, "--nodes=2", "--gpus-per-node=4", "--per=node")
    assert directives["ntasks-per-node"] == "1" and directives["gpus-per-node"] == "4"
    exports = [shlex.split(line, comments=True) for line in lines if "JAX_LOCAL_DEVICE_IDS" in line]
    assert exports == [["export", "JAX_LOCAL_DEVICE_IDS=0,1,2,3"]]


# --------------------------------------------------------------------------- local


def test_local_dry_run_gives_each_process_its_id_and_fake_devices(capsys):
    out = _dry_run(capsys, "local", "--processes=3", "--devices-per-process=2", "--port=4567")
    commands, _ = parse_script(out)
    assert commands[-1] == ["wait"]
    commands = commands[:-1]
    assert len(commands) == 3
    for i, argv in enumerate(commands):
        env = dict(a.split("=", 1) for a in argv if "=" in a and a.split("=")[0].isupper())
        cluster = distributed.resolve(env=env)
        assert (cluster.coordinator, cluster.num_processes, cluster.process_id) == (
            "127.0.0.1:4567", 3, i)
        assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
        assert argv[argv.index("t5x_like.cli") + 1 :] == TRAIN


def test_local_env_replaces_a_device_count_and_keeps_other_xla_flags():
    base = {"XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8",
            "T5X_LIKE_DISTRIBUTED": "auto"}
    env = local.process_env(base, index=1, processes=2, port=99, devices=4)
    assert env["XLA_FLAGS"].split() == ["--xla_cpu_foo=1",
                                        "--xla_force_host_platform_device_count=4"]
    assert "T5X_LIKE_DISTRIBUTED" not in env and env["T5X_LIKE_PROCESS_ID"] == "1"


def test_local_stops_the_others_when_one_process_fails(monkeypatch, capsys):
    """Process 1 fails at once; process 0 would sleep for a minute but is stopped."""
    script = (
        "import os, sys, time\n"
        "i = int(os.environ['T5X_LIKE_PROCESS_ID'])\n"
        "print('hello from', i, os.environ['T5X_LIKE_COORDINATOR'], flush=True)\n"
        "time.sleep(1)\n"
        "sys.exit(3) if i == 1 else time.sleep(60)\n"
    )
    monkeypatch.setattr(local, "_argv", lambda command: [sys.executable, "-c", script])
    args = cli.build_parser().parse_args(["launch", "local", "--processes=2", "--", "train"])
    start = time.monotonic()
    status = local.run(args, ["t5x-like", "train"])
    assert status == 3
    assert time.monotonic() - start < 30  # not the 60 s process 0 would have slept
    captured = capsys.readouterr()
    assert "[0] hello from 0 127.0.0.1:" in captured.out
    assert "[1] hello from 1 127.0.0.1:" in captured.out
    assert "process 1 exited with status 3" in captured.err


# --------------------------------------------------------------------------- plans and errors


def test_a_failed_step_skips_the_rest_but_cleanup_still_runs(tmp_path):
    def touch(name, code=0):
        script = f"open({str(tmp_path / name)!r}, 'w'); raise SystemExit({code})"
        return [sys.executable, "-c", script]

    plan = Plan()
    plan.add(File(str(tmp_path / "manifest"), "x\n"))
    plan.add(Command(touch("created")))
    plan.add(Command(touch("trained", code=5)))
    plan.add(Command(touch("after-training")))
    plan.add(Command(touch("deleted"), cleanup=True))
    assert execute(plan) == 5
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == ["created", "deleted", "manifest", "trained"]
    for p in tmp_path.iterdir():
        p.unlink()
    assert execute(plan, keep=True) == 5
    assert not (tmp_path / "deleted").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["tpu-vm", "--name=a", "--project=p", "--zone=z", "--accelerator-type=v9x-8"],
         "unknown TPU accelerator type 'v9x-8'"),
        (["gke", "--name=a", "--image=i", "--tpu=v5p", "--topology=4x4"],
         "--topology '4x4' is not a 3-d v5p topology"),
        (["gke", "--name=a", "--image=i", "--tpu=v5e", "--gpu=nvidia-l4", "--topology=2x2"],
         "pass exactly one of --tpu"),
        (["slurm", "--nodes=0"], "--nodes must be at least 1"),
    ],
)
def test_bad_launch_options_are_one_sentence(capsys, argv, message):
    assert cli.main(["launch", *argv, "--dry-run", "--", *TRAIN]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {message}")


def test_launch_needs_a_train_or_eval_command(capsys):
    assert cli.main(["launch", "slurm", "--nodes=1", "--dry-run"]) == 2
    assert "launch needs the command to run after '--'" in capsys.readouterr().err
    assert cli.main(["launch", "slurm", "--nodes=1", "--dry-run", "--", "infer"]) == 2
    assert "not 'infer'" in capsys.readouterr().err


# --------------------------------------------------------------------------- distributed.resolve


def test_resolve_single_explicit_and_auto():
    assert distributed.resolve(env={}).mode == "single"
    env = {"T5X_LIKE_COORDINATOR": "10.0.0.2:1234", "T5X_LIKE_NUM_PROCESSES": "4",
           "T5X_LIKE_PROCESS_ID": "3"}
    assert distributed.resolve(env=env) == distributed.Cluster("explicit", "10.0.0.2:1234", 4, 3)
    # flags win over the environment
    args = cli.build_parser().parse_args(
        ["train", "--config=c", "--workdir=w", "--process-id=1", "--coordinator=h:5"]
    )
    cluster = distributed.resolve(args, env=env)
    assert (cluster.coordinator, cluster.process_id, cluster.num_processes) == ("h:5", 1, 4)
    assert distributed.resolve(env={**env, "T5X_LIKE_NUM_PROCESSES": "1",
                                     "T5X_LIKE_PROCESS_ID": "0"}).mode == "single"
    assert distributed.resolve(env={"T5X_LIKE_DISTRIBUTED": "auto"}).mode == "auto"
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NODELIST": "n1,n2", "SLURM_NTASKS": "2",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "T5X_LIKE_DISTRIBUTED": "off"}
    assert distributed.resolve(env=slurm).mode == "single"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"T5X_LIKE_COORDINATOR": "h:1", "T5X_LIKE_NUM_PROCESSES": "2",
          "T5X_LIKE_PROCESS_ID": "2"}, "process id 2 is out of range for 2 processes"),
        ({"T5X_LIKE_COORDINATOR": "h:1", "T5X_LIKE_NUM_PROCESSES": "2",
          "T5X_LIKE_PROCESS_ID": "-1"}, "process id -1 is out of range"),
        ({"T5X_LIKE_COORDINATOR": "h", "T5X_LIKE_NUM_PROCESSES": "2",
          "T5X_LIKE_PROCESS_ID": "0"}, "coordinator address 'h' is not HOST:PORT"),
        ({"T5X_LIKE_COORDINATOR": "h:99999", "T5X_LIKE_NUM_PROCESSES": "2",
          "T5X_LIKE_PROCESS_ID": "0"}, "coordinator address 'h:99999' is not HOST:PORT"),
        ({"T5X_LIKE_COORDINATOR": "h:1"}, "num-processes, process-id is missing"),
        ({"T5X_LIKE_NUM_PROCESSES": "two", "T5X_LIKE_PROCESS_ID": "0"},
         "T5X_LIKE_NUM_PROCESSES must be an integer, got 'two'"),
        ({"T5X_LIKE_DISTRIBUTED": "yes"}, "$T5X_LIKE_DISTRIBUTED='yes' must be"),
    ],
)
def test_resolve_errors(env, message):
    with pytest.raises(UserError, match=None) as info:
        distributed.resolve(env=env)
    assert message in str(info.value)
