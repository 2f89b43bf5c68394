"""A JobSet on GKE: one pod per TPU host (per slice) or per GPU node, run to its end.

The manifest is ``launch/jobset.yaml`` with what the flags say filled in; the plan is
``launch/gke.sh`` (apply, stream logs, wait for the JobSet's Completed/Failed condition, exit
with it, delete on every exit) with the manifest inside.

TPU: ``--tpu v5e --topology 4x4 [--num-slices K]`` -> one replicated job per slice, one pod
per host of the slice (v5e/v6e slices up to 8 chips are one host; otherwise 4 chips a host),
nodes picked by ``cloud.google.com/gke-tpu-accelerator`` / ``gke-tpu-topology``; every pod
runs with ``T5X_LIKE_DISTRIBUTED=auto`` (JAX reads the TPU worker list GKE provides).
Several slices also get the MEGASCALE_* variables and ``--config.mesh.dcn_data=K``.

GPU: ``--gpu nvidia-h100-80gb --gpus-per-node 8 --nodes N`` -> N pods with an explicit
coordinator: pod 0's stable DNS name from the JobSet's headless service.

The workdir is ``gs://`` (the pods' service account needs access: Workload Identity), or a
folder under ``/gcs/BUCKET`` with ``--gcs-fuse-bucket BUCKET`` (the GCS FUSE CSI driver).
Preemption: ``--max-restarts`` recreates every pod, which resume from the last checkpoint;
``--grace-seconds`` gives the SIGTERM checkpoint its time.
"""

from __future__ import annotations

import argparse
import math

import yaml

from t5x_like.errors import UserError
from t5x_like.launch import Plan, Script, parse_env, workdir_of
from t5x_like.launch.templates import Raw, read, render

# --tpu -> (GKE accelerator label, topology rank)
TPU_TYPES = {
    "v4": ("tpu-v4-podslice", 3),
    "v5e": ("tpu-v5-lite-podslice", 2),
    "v5p": ("tpu-v5p-slice", 3),
    "v6e": ("tpu-v6e-slice", 2),
}
COORDINATOR_PORT = 1234
MEGASCALE_PORT = 8080
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # pod annotation: 0..N-1
FUSE_DRIVER = "gcsfuse.csi.storage.gke.io"
FUSE_ROOT = "/gcs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, help="JobSet name (lowercase, DNS-safe)")
    p.add_argument("--image", required=True, help="container image with t5x-like installed")
    p.add_argument("--namespace", default="default")
    p.add_argument("--tpu", choices=sorted(TPU_TYPES), help="TPU generation of the node pool")
    p.add_argument("--topology", help="TPU slice topology, e.g. 4x4 (v5e/v6e), 2x2x4 (v5p)")
    p.add_argument("--num-slices", type=int, default=1, help="TPU slices (multislice)")
    p.add_argument("--gpu", help="GPU node label, e.g. nvidia-h100-80gb")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, default=1, help="GPU nodes (one pod each)")
    p.add_argument("--manifest", help="where to write the manifest (default NAME.jobset.yaml)")
    p.add_argument("--max-restarts", type=int, default=10,
                   help="JobSet restarts after a failed or preempted pod (default 10)")
    p.add_argument("--grace-seconds", type=int, default=300,
                   help="terminationGracePeriodSeconds: time for the SIGTERM checkpoint")
    p.add_argument("--service-account", help="Kubernetes service account of the pods "
                   "(Workload Identity, for gs:// access)")
    p.add_argument("--gcs-fuse-bucket", help=f"mount this bucket at {FUSE_ROOT}/BUCKET in every "
                   "pod (GCS FUSE CSI driver)")
    p.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="environment variable for the pods (repeatable)")
    p.add_argument("--keep", action="store_true", help="do not delete the JobSet at the end")


def tpu_hosts(tpu: str, topology: str) -> tuple[int, int]:
    """(hosts per slice, chips per host) of a GKE TPU slice."""
    try:
        dims = [int(d) for d in topology.lower().split("x")]
    except ValueError:
        dims = []
    rank = TPU_TYPES[tpu][1]
    if len(dims) != rank or min(dims) < 1:
        example = "2x4" if rank == 2 else "2x2x2"
        raise UserError(f"--topology {topology!r} is not a {rank}-d {tpu} topology like {example}")
    chips = math.prod(dims)
    if tpu in ("v5e", "v6e") and chips <= 8:
        return 1, chips
    if chips % 4:
        raise UserError(f"a multi-host {tpu} topology has a multiple of 4 chips, not {chips}")
    return chips // 4, 4


def manifest(args: argparse.Namespace, command: list[str]) -> dict:
    """The JobSet as a dict (written as YAML)."""
    env = []
    if args.tpu:
        hosts, chips = tpu_hosts(args.tpu, args.topology or "")
        replicas, job_name = args.num_slices, "slice"
        env.append({"name": "T5X_LIKE_DISTRIBUTED", "value": "auto"})
        if args.num_slices > 1:
            env += [
                {
                    "name": "MEGASCALE_COORDINATOR_ADDRESS",
                    "value": f"{args.name}-{job_name}-0-0.{args.name}",
                },
                {"name": "MEGASCALE_NUM_SLICES", "value": str(args.num_slices)},
                {
                    "name": "MEGASCALE_SLICE_ID",
                    "valueFrom": {
                        "fieldRef": {
                            "fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"
                        }
                    },
                },
                {"name": "MEGASCALE_PORT", "value": str(MEGASCALE_PORT)},
            ]
        node_selector = {
            "cloud.google.com/gke-tpu-accelerator": TPU_TYPES[args.tpu][0],
            "cloud.google.com/gke-tpu-topology": args.topology,
        }
        resources = {"google.com/tpu": chips}
        pod_extra = {"hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet"}
    else:
        hosts, replicas, job_name = args.nodes, 1, "workers"
        env += [
            {
                "name": "T5X_LIKE_COORDINATOR",
                "value": f"{args.name}-{job_name}-0-0.{args.name}:{COORDINATOR_PORT}",
            },
            {"name": "T5X_LIKE_NUM_PROCESSES", "value": str(args.nodes)},
            {
                "name": "T5X_LIKE_PROCESS_ID",
                "valueFrom": {
                    "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}
                },
            },
        ]
        node_selector = {"cloud.google.com/gke-accelerator": args.gpu}
        resources = {"nvidia.com/gpu": args.gpus_per_node}
        pod_extra = {}
    env += [
        {"name": k, "value": v} for k, _, v in (pair.partition("=") for pair in args.env)
    ]
    jobset = yaml.safe_load(read("jobset.yaml"))
    jobset["metadata"].update(name=args.name, namespace=args.namespace)
    jobset["spec"]["failurePolicy"]["maxRestarts"] = args.max_restarts
    (rjob,) = jobset["spec"]["replicatedJobs"]
    rjob.update(name=job_name, replicas=replicas)
    job = rjob["template"]["spec"]
    job.update(parallelism=hosts, completions=hosts)
    pod = job["template"]
    spec = pod["spec"]
    spec.update(nodeSelector=node_selector, terminationGracePeriodSeconds=args.grace_seconds,
                **pod_extra)
    if args.service_account:
        spec["serviceAccountName"] = args.service_account
    (container,) = spec["containers"]
    container.update(image=args.image, command=command)
    container["env"] = [*container.get("env", []), *env]
    container["resources"]["limits"] = resources
    if args.gcs_fuse_bucket:
        pod["metadata"]["annotations"]["gke-gcsfuse/volumes"] = "true"
        spec.setdefault("volumes", []).append({
            "name": "gcs",
            "csi": {
                "driver": FUSE_DRIVER,
                "volumeAttributes": {"bucketName": args.gcs_fuse_bucket,
                                     "mountOptions": "implicit-dirs"},
            },
        })
        container.setdefault("volumeMounts", []).append(
            {"name": "gcs", "mountPath": f"{FUSE_ROOT}/{args.gcs_fuse_bucket}"})
    return jobset


def check_workdir(args: argparse.Namespace, command: list[str]) -> None:
    """Pods keep nothing: the workdir is gs:// or on the FUSE-mounted bucket."""
    workdir = workdir_of(command) or ""
    mounted = f"{FUSE_ROOT}/{args.gcs_fuse_bucket}/" if args.gcs_fuse_bucket else None
    if command[1] == "train" and not (
        workdir.startswith("gs://") or (mounted and workdir.startswith(mounted))
    ):
        where = f"a gs:// path or a folder under {mounted}" if mounted else "a gs:// path"
        raise UserError(f"--workdir must be {where} on GKE, not {workdir!r}: a pod's disk is "
                        "lost when it stops, and every pod writes its shards of a checkpoint")


def plan(args: argparse.Namespace, command: list[str]) -> Plan:
    if bool(args.tpu) == bool(args.gpu):
        raise UserError("pass exactly one of --tpu (with --topology) or --gpu")
    if args.tpu and not args.topology:
        raise UserError(f"--tpu {args.tpu} needs --topology, e.g. 4x4")
    for flag, value in (
        ("--num-slices", args.num_slices),
        ("--nodes", args.nodes),
        ("--gpus-per-node", args.gpus_per_node),
        ("--grace-seconds", args.grace_seconds),
    ):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    parse_env(args.env)
    check_workdir(args, command)
    if args.tpu and args.num_slices > 1:
        command = [*command, f"--config.mesh.dcn_data={args.num_slices}"]
    jobset = manifest(args, command)
    rjob = jobset["spec"]["replicatedJobs"][0]
    pods = rjob["replicas"] * rjob["template"]["spec"]["parallelism"]
    script = render(
        "gke.sh",
        {
            "NAME": args.name,
            "NAMESPACE": args.namespace,
            "MANIFEST": args.manifest or f"{args.name}.jobset.yaml",
            "PODS": max(pods, 5),
            "KEEP": args.keep,
            "JOBSET": Raw(yaml.safe_dump(jobset, sort_keys=False)),
        },
    )
    return Plan([Script(script)], notes=[f"JobSet {args.name}: {pods} pod(s) running "
                                         f"{command[1]}, restarted up to {args.max_restarts}x"])
