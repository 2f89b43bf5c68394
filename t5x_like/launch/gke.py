"""A JobSet on GKE: one pod per TPU host (per slice) or per GPU node, applied with kubectl.

TPU: ``--tpu v5e --topology 4x4 [--num-slices K]`` -> one replicated job per slice, one pod
per host of the slice (v5e/v6e slices up to 8 chips are one host; otherwise 4 chips a host),
nodes picked by ``cloud.google.com/gke-tpu-accelerator`` / ``gke-tpu-topology``; every pod
runs with ``T5X_LIKE_DISTRIBUTED=auto`` (JAX reads the TPU worker list GKE provides).
Several slices also get the MEGASCALE_* variables for multislice.

GPU: ``--gpu nvidia-h100-80gb --gpus-per-node 8 --nodes N`` -> N pods with an explicit
coordinator: pod 0's stable DNS name from the JobSet's headless service.
"""

from __future__ import annotations

import argparse
import math

from t5x_like.errors import UserError
from t5x_like.launch import Command, File, Plan

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


def _labels(name: str) -> str:
    return f"jobset.sigs.k8s.io/jobset-name={name}"


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
    container = {
        "name": "t5x-like",
        "image": args.image,
        "command": command,
        "env": env,
        "resources": {"limits": resources},
    }
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {
            "name": args.name,
            "namespace": args.namespace,
            "annotations": {
                "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"
            },
        },
        "spec": {
            "failurePolicy": {"maxRestarts": 0},
            "network": {"enableDNSHostnames": True},
            "replicatedJobs": [
                {
                    "name": job_name,
                    "replicas": replicas,
                    "template": {
                        "spec": {
                            "parallelism": hosts,
                            "completions": hosts,
                            "completionMode": "Indexed",
                            "backoffLimit": 0,
                            "template": {
                                "spec": {
                                    "restartPolicy": "Never",
                                    "nodeSelector": node_selector,
                                    **pod_extra,
                                    "containers": [container],
                                }
                            },
                        }
                    },
                }
            ],
        },
    }


def plan(args: argparse.Namespace, command: list[str]) -> Plan:
    if bool(args.tpu) == bool(args.gpu):
        raise UserError("pass exactly one of --tpu (with --topology) or --gpu")
    if args.tpu and not args.topology:
        raise UserError(f"--tpu {args.tpu} needs --topology, e.g. 4x4")
    for flag, value in (
        ("--num-slices", args.num_slices),
        ("--nodes", args.nodes),
        ("--gpus-per-node", args.gpus_per_node),
    ):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    import yaml

    jobset = manifest(args, command)
    pods = jobset["spec"]["replicatedJobs"][0]
    total = pods["replicas"] * pods["template"]["spec"]["parallelism"]
    path = args.manifest or f"{args.name}.jobset.yaml"
    ns = [f"--namespace={args.namespace}"]
    out = Plan(notes=[f"JobSet {args.name}: {total} pod(s) running {command[1]}"])
    out.add(File(path, yaml.safe_dump(jobset, sort_keys=False), note="the JobSet manifest"))
    out.add(Command(["kubectl", "apply", "-f", path], note="submit it"))
    selector = f"--selector={_labels(args.name)}"
    out.add(
        Command(
            ["kubectl", "wait", "--for=condition=Ready", "pod", selector, "--timeout=60m", *ns],
            note="wait for the pods to start",
        )
    )
    out.add(
        Command(
            [
                "kubectl",
                "logs",
                "--follow",
                selector,
                "--prefix",
                f"--max-log-requests={max(total, 5)}",
                *ns,
            ],
            note="stream every pod's log until they finish",
        )
    )
    out.add(
        Command(
            ["kubectl", "delete", "jobset", args.name, *ns], note="delete the JobSet", cleanup=True
        )
    )
    return out
