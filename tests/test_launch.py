"""Launchers, checked as far as this machine can check them without cloud capacity.

- Every printed script (and every script inside one: the TPU VM worker script, the sbatch
  file) passes ``shellcheck``.
- Every ``gcloud`` command line uses only flags that the gcloud reference lists for that
  command (GCLOUD_FLAGS below, with its source).
- Every JobSet manifest validates against the JobSet CRD's own OpenAPI schema
  (tests/data/jobset/, kubernetes-sigs/jobset v0.12.0), unknown fields rejected as
  ``kubectl apply``'s strict field validation does.
- What the launchers give their workers is fed back: the worker script's settings are read
  by bash, the worker script itself runs here (detach, follow, status) on a real command, the
  manifests' environment and the sbatch directives go through ``distributed.resolve`` and
  JAX's own SLURM cluster detection.
- ``launch local`` runs for real (test_local_* and tests/test_multiprocess.py).
"""

import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from t5x_like import cli, distributed
from t5x_like import config as config_lib
from t5x_like.errors import UserError
from t5x_like.experiment import import_task_modules
from t5x_like.launch import ROOT, Command, File, Plan, Script, execute, local, templates, tpu_vm

SHELLCHECK = Path(sys.executable).parent / "shellcheck"
DATA = Path(__file__).parent / "data" / "jobset"
WORKDIR = "gs://my-bucket/runs/t5_base"
TRAIN = [
    "train",
    "--config",
    "t5_span_corruption.py:base",
    "--workdir",
    WORKDIR,
    "--config.train.num_steps=100",
]
WORKER = ["t5x-like", *TRAIN]

# Flags of each gcloud command we print, from the GA gcloud reference pages
# (https://cloud.google.com/sdk/gcloud/reference/compute/tpus/...: tpu-vm create, delete,
# describe, scp, ssh; queued-resources create, delete, describe), as last updated 2025-05-07,
# plus the gcloud-wide flags every command takes. A flag outside this table fails the test.
GCLOUD_VERSION = "gcloud GA reference of 2025-05-07"
GCLOUD_WIDE = {"--project", "--format", "--quiet", "--verbosity", "--account", "--configuration",
               "--flags-file", "--flatten", "--impersonate-service-account", "--log-http",
               "--trace-token", "--user-output-enabled", "--billing-project", "--help"}
GCLOUD_FLAGS = {
    "tpu-vm create": {"--zone", "--version", "--async", "--boot-disk", "--data-disk",
                      "--description", "--internal-ips", "--labels", "--metadata",
                      "--metadata-from-file", "--network", "--preemptible", "--queue-count",
                      "--range", "--reserved", "--scopes", "--service-account",
                      "--shielded-secure-boot", "--spot", "--subnetwork", "--tags",
                      "--accelerator-type", "--topology", "--type"},
    "tpu-vm delete": {"--zone", "--async"},
    "tpu-vm describe": {"--zone"},
    "tpu-vm scp": {"--compress", "--dry-run", "--force-key-file-overwrite", "--internal-ip",
                   "--plain", "--recurse", "--scp-flag", "--ssh-key-file",
                   "--strict-host-key-checking", "--worker", "--zone", "--ssh-key-expiration",
                   "--ssh-key-expire-after"},
    "tpu-vm ssh": {"--dry-run", "--force-key-file-overwrite", "--internal-ip", "--plain",
                   "--ssh-flag", "--ssh-key-file", "--strict-host-key-checking", "--worker",
                   "--zone", "--command", "--output-directory", "--ssh-key-expiration",
                   "--ssh-key-expire-after"},
    "queued-resources create": {"--zone", "--runtime-version", "--accelerator-type",
                                "--topology", "--type", "--node-id", "--node-count",
                                "--node-prefix", "--async", "--boot-disk", "--data-disk",
                                "--description", "--guaranteed", "--internal-ips", "--labels",
                                "--metadata", "--metadata-from-file", "--network", "--range",
                                "--reserved", "--scopes", "--service-account",
                                "--shielded-secure-boot", "--spot", "--subnetwork", "--tags",
                                "--valid-after-duration", "--valid-after-time",
                                "--valid-until-duration", "--valid-until-time"},
    "queued-resources delete": {"--zone", "--async", "--force"},
    "queued-resources describe": {"--zone"},
}


def _dry_run(capsys, *argv, command=TRAIN):
    code = cli.main(["launch", *argv, "--dry-run", "--", *command])
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def shellcheck(text: str, tmp_path: Path, name: str = "script.sh") -> None:
    path = tmp_path / name
    path.write_text(text)
    done = subprocess.run([str(SHELLCHECK), str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def heredocs(text: str) -> dict[str, str]:
    """{delimiter: body} of the quoted here-documents (``<<'EOF'``) in a script."""
    found = {}
    for m in re.finditer(r"<<'(\w+)'\n(.*?)\n\1\n", text, re.S):
        found[m.group(1)] = m.group(2) + "\n"
    return found


def logical_lines(text: str) -> list[str]:
    return text.replace("\\\n", " ").splitlines()


def array_flags(text: str) -> dict[str, set[str]]:
    """Flags in bash array assignments: ``WHERE=(--zone=... ...)``, ``EXTRA+=(--spot)``."""
    arrays: dict[str, set[str]] = {}
    for m in re.finditer(r"\b(\w+)\+?=\(([^)]*)\)", text):
        flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m.group(2)))
        arrays.setdefault(m.group(1), set()).update(flags)
    return arrays


def gcloud_calls(text: str) -> list[tuple[str, set[str]]]:
    """(``group verb``, flag names) of every ``gcloud compute tpus ...`` call, array flags
    included; a call is cut at the shell's ``||``, ``&&``, ``)`` or ``;``."""
    arrays, calls = array_flags(text), []
    for line in logical_lines(text):
        for m in re.finditer(r"\bgcloud compute tpus ([\w-]+) ([\w-]+)(.*?)(?:\|\||&&|\);|$)",
                             line):
            rest = m.group(3)
            flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest))
            for name in re.findall(r'"\$\{(\w+)\[@\]\}"', rest):
                flags |= arrays.get(name, set())
            calls.append((f"{m.group(1)} {m.group(2)}", flags))
    return calls


def settings(script: str, *names: str) -> dict[str, list[str]]:
    """The values bash gives the named settings (arrays as lists) when it reads the script's
    settings block (everything before the line that closes it)."""
    block = script.split("# -------------------------------------------------------------"
                         "-------------------------------\n", 1)[0]
    prints = "".join(f'printf "%s\\0" "${{{n}[@]}}"; printf "\\1";' for n in names)
    done = subprocess.run(["bash", "-c", block + "\n" + prints], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    parts = done.stdout.split("\1")[: len(names)]
    return {n: [v for v in part.split("\0") if v] for n, part in zip(names, parts, strict=True)}


def check_gcloud(text: str) -> list[str]:
    calls = gcloud_calls(text)
    assert calls
    for command, flags in calls:
        assert command in GCLOUD_FLAGS, f"gcloud compute tpus {command} is not in the table"
        unknown = flags - GCLOUD_FLAGS[command] - GCLOUD_WIDE
        assert not unknown, f"{command}: {unknown} not in {GCLOUD_VERSION}"
    return [c for c, _ in calls]


# --------------------------------------------------------------------------- Cloud TPU VM

TPU_ARGS = ["tpu-vm", "--name=t5-v5e", "--project=my-project", "--zone=us-west4-a",
            "--accelerator-type=v5litepod-16"]


@pytest.mark.parametrize(
    "extra, queued, nodes",
    [
        ([], False, ["t5-v5e"]),
        (["--spot", "--queued", "--env=XLA_FLAGS=--xla_foo=1", "--max-restarts=3"], True,
         ["t5-v5e"]),
        (["--num-slices=2", "--install=git+https://example.com/t5x_like"], True,
         ["t5-v5e-0", "t5-v5e-1"]),
    ],
)
def test_tpu_vm_script_passes_shellcheck_and_uses_only_known_gcloud_flags(
        capsys, tmp_path, extra, queued, nodes):
    out = _dry_run(capsys, *TPU_ARGS, *extra)
    shellcheck(out, tmp_path)
    (worker,) = heredocs(out).values()
    shellcheck(worker, tmp_path, "worker.sh")
    used = check_gcloud(out)
    group = "queued-resources" if queued else "tpu-vm"
    assert {f"{group} create", f"{group} delete", "tpu-vm scp", "tpu-vm ssh"} <= set(used)
    if queued:  # FAILED and SUSPENDED end the wait instead of waiting forever
        assert "queued-resources describe" in used
        assert re.search(r"FAILED \| SUSPENDED\)\n.*\n.*\n\s+return 1", out)

    values = settings(out, "NAME", "NUM_SLICES", "QUEUED", "SPOT", "MAX_RESTARTS", "KEEP",
                      "CHECKOUT", "SOURCES")
    assert values["QUEUED"] == ["1" if queued else "0"]
    assert values["SPOT"] == ["1" if "--spot" in extra else "0"]
    assert values["MAX_RESTARTS"] == ["3" if "--max-restarts=3" in extra else "10"]
    assert values["KEEP"] == ["0"]
    assert values["NUM_SLICES"] == [str(len(nodes))]
    if "--num-slices=2" in extra:
        assert values["CHECKOUT"] == [] and values["SOURCES"] == []
    else:  # the checkout is packed: every folder it names exists
        assert values["CHECKOUT"] == [str(ROOT)]
        assert all((ROOT / p).exists() for p in values["SOURCES"])
        assert {"t5x_like", "configs", "tasks", "launch"} <= set(values["SOURCES"])

    run = settings(worker, "RUN", "ENV_VARS", "INSTALL", "PYTHON_VERSION")
    expected = WORKER + (["--config.mesh.dcn_data=2"] if len(nodes) > 1 else [])
    assert run["RUN"] == expected
    assert run["PYTHON_VERSION"] == ["3.11"]
    assert run["ENV_VARS"] == (["XLA_FLAGS=--xla_foo=1"] if "--queued" in extra else [])
    # cleanup is a trap on EXIT, set before anything is created
    assert out.index("trap cleanup EXIT") < out.index("\nrestarts=0")


def test_tpu_vm_script_is_rendered_from_the_launch_folder(capsys):
    """One copy: every line of launch/tpu_vm.sh that holds no setting is in the output."""
    out = _dry_run(capsys, *TPU_ARGS)
    worker = heredocs(out)["T5X_LIKE_WORKER_EOF"]
    for name, text in (("tpu_vm.sh", out), ("tpu_vm_worker.sh", worker)):
        template = (ROOT / "launch" / name).read_text()
        fixed = [line for line in template.splitlines() if "@" not in line or "\"$" in line]
        missing = [line for line in fixed if line not in text.splitlines()]
        assert not missing, (name, missing[:3])


def test_worker_script_runs_detached_and_reports_the_exit_status(tmp_path):
    """The worker script itself, here: ``detach`` starts the command with nohup/setsid and
    returns at once, ``follow`` prints the log and exits with the command's status, as does
    ``status``; the command sees the --env variables and the distributed mode that
    ``distributed.resolve`` reads."""
    probe = (
        "import json, os, sys, time\n"
        "time.sleep(2)\n"
        "print('ENV', json.dumps(dict(os.environ)), flush=True)\n"
        "sys.exit(3)\n"
    )
    args = cli.build_parser().parse_args(["launch", *TPU_ARGS, "--env=X=a b", "--", "train"])
    script = tpu_vm.worker_script(args, [sys.executable, "-c", probe])
    home = tmp_path / "home"
    (home / "t5x_like").mkdir(parents=True)
    (home / "worker.sh").write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("T5X_LIKE_", "X"))}
    env["HOME"] = str(home)

    def worker(verb, timeout=60):
        return subprocess.run(["bash", str(home / "worker.sh"), verb], env=env, timeout=timeout,
                              capture_output=True, text=True)

    start = time.monotonic()
    assert worker("detach").returncode == 0
    assert time.monotonic() - start < 2  # detached: the 2 s command is still running
    assert not (home / "t5x_like.status").exists()
    followed = worker("follow")
    assert followed.returncode == 3, followed.stderr
    (line,) = [line for line in followed.stdout.splitlines() if line.startswith("ENV ")]
    seen = json.loads(line[4:])
    assert seen["X"] == "a b" and distributed.resolve(env=seen).mode == "auto"
    assert worker("status").returncode == 3
    assert (home / "t5x_like.status").read_text().strip() == "3"


@pytest.mark.parametrize(
    "argv, message",
    [
        ([*TPU_ARGS, "--", "train", "--config", "c.py", "--workdir", "/mnt/runs/x"],
         "--workdir must be a gs:// path on a TPU VM, not '/mnt/runs/x'"),
        ([*TPU_ARGS, "--env=1X=2", "--", *TRAIN], "--env '1X=2' is not NAME=VALUE"),
        ([*TPU_ARGS, "--max-restarts=-1", "--", *TRAIN], "--max-restarts must be >= 0"),
        (["gke", "--name=a", "--image=i", "--gpu=nvidia-l4", "--", "train", "--workdir=runs/x"],
         "--workdir must be a gs:// path on GKE, not 'runs/x'"),
    ],
)
def test_remote_runs_refuse_a_local_workdir_in_one_sentence(capsys, argv, message):
    split = argv.index("--")
    assert cli.main(["launch", *argv[:split], "--dry-run", *argv[split:]]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {message}")


# --------------------------------------------------------------------------- GKE


def _strict(node):
    """The CRD schema as ``kubectl apply`` (strict field validation) applies it: a field the
    schema does not name is an error, except where the schema keeps unknown fields."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@pytest.fixture(scope="module")
def jobset_validator():
    schema = _strict(json.loads((DATA / "jobset_v1alpha2_schema.json").read_text()))
    # Kubernetes structural schemas are OpenAPI v3.0 schemas, a JSON Schema draft 4 dialect
    return jsonschema.Draft4Validator(schema)


def _gke(capsys, tmp_path, *argv, command=TRAIN):
    out = _dry_run(capsys, "gke", "--name=t5", "--image=us-docker.pkg.dev/p/r/t5x:1", *argv,
                   command=command)
    shellcheck(out, tmp_path)
    (manifest,) = heredocs(out).values()
    jobset = yaml.safe_load(manifest)
    (rjob,) = jobset["spec"]["replicatedJobs"]
    pod = rjob["template"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return out, jobset, rjob, pod, container


@pytest.mark.parametrize(
    "tpu, topology, slices, hosts, chips, label",
    [
        ("v5e", "4x4", 1, 4, 4, "tpu-v5-lite-podslice"),  # 16 chips, 4 per host
        ("v5e", "2x4", 1, 1, 8, "tpu-v5-lite-podslice"),  # one 8-chip host
        ("v5p", "2x2x4", 2, 4, 4, "tpu-v5p-slice"),
        ("v6e", "8x8", 3, 16, 4, "tpu-v6e-slice"),
    ],
)
def test_gke_tpu_jobset_validates_and_gives_every_pod_what_jax_needs(
        capsys, tmp_path, jobset_validator, tpu, topology, slices, hosts, chips, label):
    out, jobset, rjob, pod, container = _gke(
        capsys, tmp_path, f"--tpu={tpu}", f"--topology={topology}", f"--num-slices={slices}",
        "--max-restarts=4", "--grace-seconds=600", "--service-account=trainer")
    errors = [e.message for e in jobset_validator.iter_errors(jobset)]
    assert not errors, errors
    assert rjob["replicas"] == slices
    spec = rjob["template"]["spec"]
    assert spec["parallelism"] == spec["completions"] == hosts
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": label,
        "cloud.google.com/gke-tpu-topology": topology,
    }
    assert container["resources"]["limits"] == {"google.com/tpu": chips}
    assert jobset["spec"]["failurePolicy"]["maxRestarts"] == 4
    assert pod["terminationGracePeriodSeconds"] == 600
    assert pod["serviceAccountName"] == "trainer"
    assert container["command"] == WORKER + (
        [f"--config.mesh.dcn_data={slices}"] if slices > 1 else [])
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert distributed.resolve(env={k: v for k, v in env.items() if v is not None}).mode == "auto"
    assert ("MEGASCALE_NUM_SLICES" in env) == (slices > 1)
    if slices > 1:
        assert env["MEGASCALE_NUM_SLICES"] == str(slices)
        # the coordinator is pod 0 of slice 0: <jobset>-<replicated job>-0-0.<jobset>
        assert env["MEGASCALE_COORDINATOR_ADDRESS"] == f"t5-{rjob['name']}-0-0.t5"
    # the launcher waits for the JobSet's own condition and exits with it
    assert 'kubectl apply -f "$MANIFEST"' in out
    assert re.search(r'\*" Completed "\*\)\n.*\n\s+exit 0', out)
    assert re.search(r'\*" Failed "\*\)\n(.*\n){2,3}\s+exit 1', out)
    assert out.index("trap cleanup EXIT") < out.index('kubectl apply -f "$MANIFEST"')


def test_gke_gpu_jobset_with_a_fuse_bucket(capsys, tmp_path, jobset_validator):
    out, jobset, rjob, pod, container = _gke(
        capsys, tmp_path, "--gpu=nvidia-h100-80gb", "--nodes=3", "--gcs-fuse-bucket=my-bucket",
        "--env=NCCL_DEBUG=INFO",
        command=["train", "--config", "c.py", "--workdir", "/gcs/my-bucket/runs/x"])
    assert not [e.message for e in jobset_validator.iter_errors(jobset)]
    assert rjob["template"]["spec"]["parallelism"] == 3
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    (volume,) = pod["volumes"]
    assert volume["csi"] == {"driver": "gcsfuse.csi.storage.gke.io", "volumeAttributes": {
        "bucketName": "my-bucket", "mountOptions": "implicit-dirs"}}
    assert container["volumeMounts"] == [{"name": "gcs", "mountPath": "/gcs/my-bucket"}]
    assert rjob["template"]["spec"]["template"]["metadata"]["annotations"] == {
        "gke-gcsfuse/volumes": "true"}
    # What pod 2 does with the manifest's environment: join pod 0's coordinator as process 2.
    env = {e["name"]: e for e in container["env"]}
    index_path = env["T5X_LIKE_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index_path == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    values = {k: e["value"] for k, e in env.items() if "value" in e} | {"T5X_LIKE_PROCESS_ID": "2"}
    cluster = distributed.resolve(env=values)
    assert (cluster.mode, cluster.num_processes, cluster.process_id) == ("explicit", 3, 2)
    assert cluster.coordinator == "t5-workers-0-0.t5:1234"
    assert values["NCCL_DEBUG"] == "INFO"


def test_the_schema_check_can_fail(capsys, tmp_path, jobset_validator):
    _, jobset, rjob, pod, container = _gke(capsys, tmp_path, "--gpu=nvidia-l4")
    container["envv"] = []  # a misspelt field
    jobset["spec"]["failurePolicy"]["maxRestarts"] = "10"  # a string for an integer
    messages = sorted(e.message for e in jobset_validator.iter_errors(jobset))
    assert len(messages) == 2, messages
    assert "'envv' was unexpected" in " ".join(messages)


def test_schema_data_is_the_recorded_release():
    readme = (DATA / "README.md").read_text()
    assert "v0.12.0" in readme and "Apache-2.0" in readme
    schema = json.loads((DATA / "jobset_v1alpha2_schema.json").read_text())
    spec = schema["properties"]["spec"]["properties"]
    assert {"replicatedJobs", "failurePolicy", "network"} <= set(spec)


# --------------------------------------------------------------------------- SLURM


def _sbatch(capsys, tmp_path, *argv):
    out = _dry_run(capsys, "slurm", "--name=t5b", *argv)
    shellcheck(out, tmp_path)
    (body,) = heredocs(out).values()
    shellcheck(body, tmp_path, "job.sbatch")
    lines = body.splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = {}
    for line in lines:
        if line.startswith("#SBATCH"):
            key, _, value = shlex.split(line)[1].removeprefix("--").partition("=")
            directives[key] = value
    return out, body, directives


def _slurm_step_env(directives: dict, procid: int) -> dict:
    """What SLURM sets in each task of the job's srun step, from the script's directives."""
    nodes, per_node = int(directives["nodes"]), int(directives["ntasks-per-node"])
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": f"gpu[01-{nodes:02d}]",
            "SLURM_NTASKS": str(nodes * per_node), "SLURM_STEP_NUM_NODES": str(nodes),
            "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid % per_node)}


def test_slurm_one_process_per_gpu_signals_requeues_and_joins(capsys, tmp_path, monkeypatch):
    from jax._src.clusters.slurm_cluster import SlurmCluster

    out, body, directives = _sbatch(
        capsys, tmp_path, "--nodes=4", "--gpus-per-node=8", "--partition=a3",
        "--stop-seconds=600", "--setup=module load cuda", "--env=NCCL_DEBUG=WARN")
    assert directives["signal"] == "B:TERM@600" and "requeue" in directives
    assert directives["nodes"] == "4" and directives["ntasks-per-node"] == "8"
    assert directives["gpus-per-node"] == "8" and directives["partition"] == "a3"
    (run_line,) = [line for line in body.splitlines() if line.startswith("RUN=(")]
    assert settings(run_line, "RUN")["RUN"] == WORKER
    assert "export NCCL_DEBUG=WARN" in body.splitlines()
    assert "scontrol requeue" in body and "trap forward_term TERM" in body
    # Task 9 of the step: JAX's own SLURM detection sees 32 processes, this one local GPU 1.
    env = _slurm_step_env(directives, 9)
    assert distributed.resolve(env={**env, "T5X_LIKE_DISTRIBUTED": "auto"}).mode == "auto"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert SlurmCluster.is_env_present()
    assert (SlurmCluster.get_process_count(), SlurmCluster.get_process_id(),
            SlurmCluster.get_local_process_id()) == (32, 9, 1)
    assert SlurmCluster.get_coordinator_address(None, None).startswith("gpu01:")


def test_slurm_setup_lines_run_under_set_u(capsys, tmp_path):
    """A setup line that reads an unset variable (as module and conda scripts do) does not
    stop the job: run the real script here; it gets past the setup to srun."""
    _, body, _ = _sbatch(capsys, tmp_path, "--nodes=1",
                         "--setup=echo \"setup saw ${T5X_LIKE_SURELY_UNSET_VARIABLE}done\"")
    path = tmp_path / "job.sbatch"
    path.write_text(body)
    env = {k: v for k, v in os.environ.items() if k != "T5X_LIKE_SURELY_UNSET_VARIABLE"}
    env["PATH"] = "/usr/bin:/bin"  # no srun here
    done = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True)
    assert "setup saw done" in done.stdout
    assert "unbound variable" not in done.stderr
    assert done.returncode == 127 and "srun" in done.stderr  # the next line, which needs SLURM


def test_slurm_one_process_per_node_sees_all_its_gpus(capsys, tmp_path):
    _, body, directives = _sbatch(capsys, tmp_path, "--nodes=2", "--gpus-per-node=4",
                                  "--per=node")
    assert directives["ntasks-per-node"] == "1" and directives["gpus-per-node"] == "4"
    exports = [shlex.split(line, comments=True) for line in body.splitlines()
               if "JAX_LOCAL_DEVICE_IDS" in line]
    assert exports == [["export", "JAX_LOCAL_DEVICE_IDS=0,1,2,3"]]


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_builds_from_this_repository():
    """What can be checked without docker: every COPY source exists, the base image's Python
    satisfies pyproject's requires-python, and the ignore file lets every source through."""
    lines = (ROOT / "launch" / "Dockerfile").read_text().splitlines()
    (base,) = [line.split()[1] for line in lines if line.startswith("FROM ")]
    version = re.match(r"python:(\d+)\.(\d+)", base)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    low, high = re.match(r">=(\d+\.\d+),<(\d+\.\d+)", project["requires-python"]).groups()
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(low) <= (int(version[1]), int(version[2])) < as_tuple(high)
    copied = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    sources = [s for group in copied for s in group]
    assert {"t5x_like", "configs", "tasks", "launch", "pyproject.toml"} <= set(sources)
    assert all((ROOT / s).exists() for s in sources)
    ignore = (ROOT / "launch" / "Dockerfile.dockerignore").read_text().splitlines()
    assert all(f"!{s}" in ignore for s in sources)


# --------------------------------------------------------------------------- configs and tasks


def test_a_config_name_works_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in ("t5_span_corruption.py", "configs/t5_span_corruption.py"):
        path = config_lib.find_config_file(spec)
        assert path == ROOT / "configs" / "t5_span_corruption.py"
    assert config_lib.load_config("t5_span_corruption.py:tiny").family == "t5"
    with pytest.raises(UserError, match="config file 'nope.py' does not exist"):
        config_lib.load_config("nope.py")


def test_task_modules_import_from_any_directory(tmp_path, monkeypatch):
    import seqio

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("".join(f"line {i} of my corpus\n" for i in range(300)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MY_CORPUS", str(corpus))
    (module,) = import_task_modules(" tasks.my_corpus , ")
    assert module.__file__ == str(ROOT / "tasks" / "my_corpus.py")
    assert "my_corpus" in seqio.TaskRegistry.names()
    (c4,) = import_task_modules("tasks.c4")
    source = seqio.TaskRegistry.get(c4.TASK).source
    assert isinstance(source, seqio.TfdsDataSource) and source.tfds_dataset.name == "c4/en:3.1.0"
    (tmp_path / "mine.py").write_text("import seqio\nNAMES = seqio.TaskRegistry.names()\n")
    (mine,) = import_task_modules(str(tmp_path / "mine.py"))
    assert "c4_en" in mine.NAMES
    with pytest.raises(UserError, match="data.task_modules names 'tasks.nope', which failed"):
        import_task_modules("tasks.nope")


def test_eval_task_finds_a_task_that_the_runs_task_modules_register(tmp_path, capsys):
    """``eval --task NAME`` looks NAME up before loading the checkpoint: the run's
    data.task_modules are imported first, so a task only they register is found (the run here
    has a config and no checkpoint, so eval stops at the checkpoint, past the lookup)."""
    module = tmp_path / "probe_tasks.py"
    module.write_text(
        "from t5x_like.evaluation import metrics\n"
        "from t5x_like.tasks import register_t2t_task\n"
        "register_t2t_task('probe_t2t_only_here', 'tfds:glue/sst2:2.0.0',\n"
        "                  inputs='sst2 sentence: {sentence}', label_names=('neg', 'pos'),\n"
        "                  metric_fns=[metrics.accuracy])\n")
    config = config_lib.base_config()
    config.data.task_modules = str(module)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(config.to_dict()))
    code = cli.main(["eval", "--checkpoint", str(tmp_path / "run"), "--task",
                     "probe_t2t_only_here"])
    err = capsys.readouterr().err
    assert code == 2 and "is registered" not in err and "checkpoint" in err, err


def test_the_c4_task_module_reads_c4_from_tfds():
    """tasks/c4.py through TFDS's own mock of c4/en:3.1.0: the first raw chunk decodes to the
    start of the first validation document TFDS gives (EOS-joined stream, T5's layout)."""
    import tensorflow_datasets as tfds

    from t5x_like.data.pipeline import raw_token_batches
    from t5x_like.data.vocab import get_vocabulary

    (c4,) = import_task_modules("tasks.c4")
    vocabulary = get_vocabulary(None)
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        texts = [ex["text"].decode() for ex in
                 tfds.as_numpy(tfds.load("c4/en:3.1.0", split="validation"))]
        batch = next(iter(raw_token_batches(c4.TASK, split="validation", raw_length=16,
                                            batch_size=1, seed=0, shuffle=False, repeat=False,
                                            vocabulary=vocabulary)))
    tokens = [int(t) for t in batch["tokens"][0] if t > 1]  # drop pad and EOS
    words = vocabulary.decode(tokens).split()  # SentencePiece normalises whitespace
    assert len(words) >= 2 and " ".join(" ".join(texts).split()).startswith(" ".join(words))


@pytest.mark.slow
def test_train_with_a_task_module_and_a_config_name_from_another_directory(tmp_path):
    """The console script, run where there is no checkout: the config comes from the shipped
    configs/, the task from tasks/my_corpus.py, the corpus from $MY_CORPUS (~70 s)."""
    from conftest import TINY_OVERRIDES

    from t5x_like.data import corpus as corpus_lib

    folder = tmp_path / "corpus"
    folder.mkdir()
    # both splits: the default corpus's train texts all hash outside any 1% validation share
    texts = [*corpus_lib.default_corpus_texts("train")[:2000],
             *corpus_lib.default_corpus_texts("validation")[:200]]
    (folder / "plays.txt").write_text("\n".join(texts))
    overrides = [o for o in TINY_OVERRIDES
                 if not any(k in o for k in ("num_steps", "eval_every", "eval_batches"))]
    done = subprocess.run(
        [str(Path(sys.executable).parent / "t5x-like"), "train", "--config",
         "t5_span_corruption.py:tiny", "--workdir", str(tmp_path / "run"), *overrides,
         "--config.train.num_steps=2", "--config.train.eval_every=2",
         "--config.train.eval_batches=1",
         "--config.data.task_modules=tasks.my_corpus", "--config.data.task=my_corpus"],
        cwd=tmp_path, env={**os.environ, "MY_CORPUS": str(folder), "JAX_PLATFORMS": "cpu"},
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["task"] == "my_corpus"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert any(json.loads(line).get("step") == 2 for line in lines)


SHIPS_FOLDERS = "share/t5x_like/launch" in (ROOT / "pyproject.toml").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not SHIPS_FOLDERS, reason="pyproject.toml has no data-files for configs/, "
                    "launch/, tasks/ yet")
def test_the_wheel_ships_configs_launch_and_tasks(tmp_path):
    """A non-editable install finds them under <prefix>/share/t5x_like (config.shipped)."""
    import zipfile

    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                           "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, pattern in (("configs", "*.py"), ("launch", "*"), ("tasks", "*.py")):
        for path in (ROOT / folder).glob(pattern):
            assert any(n.endswith(f"/data/share/t5x_like/{folder}/{path.name}") for n in names)


def test_templates_are_found_and_every_key_is_filled():
    assert templates.folder() == ROOT / "launch"
    with pytest.raises(ValueError, match="no value for"):
        templates.render("tpu_vm_worker.sh", {})


# --------------------------------------------------------------------------- local


def _parse_local(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    return [shlex.split(line.removesuffix(" &")) for line in lines]


def test_local_dry_run_gives_each_process_its_id_and_fake_devices(capsys, tmp_path):
    out = _dry_run(capsys, "local", "--processes=3", "--devices-per-process=2", "--port=4567")
    shellcheck(out, tmp_path)
    commands = _parse_local(out)
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


def test_a_script_plan_runs_with_bash_and_keeps_its_status_and_its_stdin(tmp_path):
    """Scripts run from a file: a command in them that reads stdin (ssh, kubectl) does not
    swallow the rest of the script."""
    marker = tmp_path / "after"
    text = f"#!/usr/bin/env bash\ncat >/dev/null\ntouch {shlex.quote(str(marker))}\nexit 7\n"
    assert execute(Plan([Script(text)])) == 7
    assert marker.exists()


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
