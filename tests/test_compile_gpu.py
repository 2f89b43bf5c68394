"""GPU rehearsal: ``t5x-like compile --topology h100:2x8`` runs XLA's CUDA compiler here, with no
GPU, through the CUDA PJRT plugin (``jax-cuda12-plugin``, the gpu-compile extra) and XLA's own
H100 target config.

The default run compiles one micro T5 train step for two H100 hosts through the command line
with ``JAX_PLATFORMS`` removed (as a user runs it): ~30 s of compile on 2 cores. What it
reports is checked against the rules (parameter bytes per GPU against ``fsdp``), against the
mesh (which collectives cross hosts) and against the table's HBM. One host and the eval step
are ``slow``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import pytest
from conftest import ROOT, TINY_CONFIG

pytest.importorskip("jax_plugins.xla_cuda12")

from t5x_like import aot, aot_gpu, experiment, hardware, platforms  # noqa: E402
from t5x_like import config as config_lib  # noqa: E402
from t5x_like.errors import UserError  # noqa: E402

# The micro T5 of tests/test_compile.py: compile time is mostly fixed cost.
MICRO = ["model.d_model=32", "model.d_kv=8", "model.num_heads=4", "model.d_ff=64",
         "model.num_encoder_layers=1", "model.num_decoder_layers=1", "data.inputs_length=32",
         "data.batch_size=16"]
# ZeRO-3 inside each host (fsdp 8 over NVLink), data parallel across the two hosts.
TWO_HOSTS = [*MICRO, "mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1", "mesh.dcn_data=2"]
# What a CPU host printed before t5x_like chose JAX_PLATFORMS and filtered the CUDA notices.
NOISE = ("TPU_WORKER_HOSTNAMES", "Failed to find host bounds", "cudart_stub",
         "Unable to load CUDA", "Traceback", "cuInit", "Jax plugin configuration error")


def _cli(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    return subprocess.run([sys.executable, "-m", "t5x_like.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "report.json"
    result = _cli("compile", "--config", TINY_CONFIG, "--topology", "h100:2x8", "--skip-eval",
                  "--json", str(out), *[f"--config.{o}" for o in TWO_HOSTS])
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout, result.stderr


def test_two_h100_hosts_compile_without_a_gpu_or_noise(two_hosts):
    report, text, stderr = two_hosts
    assert report["chips"] == 16 and report["hosts"] == 2
    assert report["device_kind"] == "NVIDIA H100 80GB HBM3"
    assert report["mesh"] == {"data": 2, "fsdp": 8, "tensor": 1}
    assert report["links"] == {"ICI": "NVLink", "DCN": "network"}
    assert [line for line in stderr.splitlines() if any(n in line for n in NOISE)] == []
    train = report["steps"]["train"]
    assert train["xla_flops_per_chip"] is None  # the GPU compiler has no cost analysis
    assert train["model_flops_per_chip"] > 0
    assert train["fits"] is True and 0 < train["memory"]["total"] < 80e9
    assert "XLA none (this compiler gives no cost analysis)" in text
    assert "HBM n/a" in text and "16 GPUs on 2 host(s)" in text


def test_parameter_bytes_per_gpu_are_the_whole_over_fsdp(two_hosts):
    """Parameter bytes / fsdp per GPU, plus the arrays no dim of which 8 divides; the compiled
    step's arguments hold them, the optimizer state and the batch."""
    report, _, _ = two_hosts
    config = config_lib.load_config(TINY_CONFIG, TWO_HOSTS)
    exp = experiment.build(config, aot.topology_devices("h100:2x8"))
    leaves = jax.tree.leaves(exp.abstract_state()["params"])
    undivided = sum(x.size * x.dtype.itemsize for x in leaves
                    if not any(d % 8 == 0 for d in x.shape))
    whole, per_gpu = report["param_bytes"], report["param_bytes_per_chip"]
    assert whole == sum(x.size * x.dtype.itemsize for x in leaves)
    assert whole / 8 <= per_gpu <= whole / 8 + undivided
    assert report["steps"]["train"]["memory"]["arguments"] >= per_gpu


def test_only_the_data_axis_crosses_hosts(two_hosts):
    """fsdp lives inside a host: its weight all-gathers and gradient reduce-scatters (groups of
    8) run on NVLink; only the gradient all-reduce over ``data`` crosses hosts."""
    report, text, _ = two_hosts
    rows = report["steps"]["train"]["collectives"]
    nvlink = {r["kind"] for r in rows if r["network"] == "ICI"}
    network = {r["kind"] for r in rows if r["network"] == "DCN"}
    assert {"all-gather", "reduce-scatter"} <= nvlink
    assert network == {"all-reduce"}
    (scatter,) = [r for r in rows if r["kind"] == "reduce-scatter"]
    assert scatter["wire_bytes"] == 7 * scatter["bytes"]  # a ring of the host's 8 GPUs
    roofline = report["steps"]["train"]["roofline"]
    assert roofline["dcn_s"] > 0 and roofline["ici_s"] > 0
    chip = hardware.chip_for_topology("h100:2x8")
    assert roofline["dcn_s"] == pytest.approx(
        sum(r["wire_bytes"] for r in rows if r["network"] == "DCN") / chip.dcn_bandwidth)
    assert "network all-reduce" in text and "NVLink all-gather" in text


def test_gpu_topologies_describe_hosts_of_gpus():
    one, two = aot.topology_devices("h100:8"), aot.topology_devices("H100:2x8")
    assert len(one) == 8 and {d.process_index for d in one} == {0}
    assert len(two) == 16 and [d.process_index for d in two] == [0] * 8 + [1] * 8
    assert {d.platform for d in two} == {"gpu"}


@pytest.mark.parametrize("generation", sorted(aot_gpu.TARGETS))
def test_each_shipped_gpu_matches_the_chip_table(generation):
    """XLA's target config (the compiler's view of the GPU) against our datasheet figures."""
    (device, *_) = aot.topology_devices(f"{generation}:1")
    chip = hardware.CHIPS[generation]
    target = (aot_gpu.TARGETS_DIR / aot_gpu.TARGETS[generation]).read_text()
    memory = int(re.search(r"device_memory_size: (\d+)", target).group(1))
    bandwidth = float(re.search(r"memory_bandwidth: (\d+)", target).group(1))
    assert generation.upper() in device.device_kind
    assert 0.97 * chip.hbm_bytes <= memory <= chip.hbm_bytes
    assert bandwidth == pytest.approx(chip.hbm_bandwidth, rel=0.01)


@pytest.mark.parametrize("topology, words", [
    ("h100:0", "no GPUs"), ("h100:0x8", "no GPUs"), ("h100:2x2x8", "no GPU topology"),
    ("b300:8", "no TPU topology"), ("h100:8", "--num-slices is for TPU slices")])
def test_a_bad_gpu_topology_is_one_sentence(topology, words):
    with pytest.raises(UserError) as e:
        aot.topology_devices(topology, num_slices=2 if "slices" in words else 1)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_mesh_that_does_not_divide_the_gpus_is_one_sentence():
    config = config_lib.load_config(TINY_CONFIG, [*MICRO, "mesh.data=3", "mesh.fsdp=1"])
    with pytest.raises(UserError) as e:
        experiment.build(config, aot.topology_devices("h100:8"))
    assert "\n" not in str(e.value)


def test_mesh_replica_groups_with_iota_device_ids_are_read():
    """XLA's GPU compiler writes a mesh's device order in iota form (``device_ids=([2,8]T(1,0))``:
    position i of the 8 x 2 mesh is device ``arange(16).reshape(2, 8).T.flat[i]``); gathering
    over axis_0 is then over one host's 8 GPUs (read as a list of numbers, it crossed hosts)."""
    attrs = ("replica_groups=mesh['axis_0'=8,'axis_1'=2], device_ids=([2,8]T(1,0)) "
             "{'axis_0'}, dimensions={0}")
    assert aot._mesh_groups(attrs) == [list(range(8)), list(range(8, 16))]


def test_accelerators_are_found_as_jax_finds_them(tmp_path):
    assert platforms.default_platforms(str(tmp_path)) == "cpu"
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nvidiactl").touch()
    assert platforms.default_platforms(str(tmp_path)) is None  # JAX picks the GPU
    (tmp_path / "dev" / "nvidiactl").unlink()
    tpu = tmp_path / "sys" / "bus" / "pci" / "devices" / "0000:00:04.0"
    tpu.mkdir(parents=True)
    (tpu / "vendor").write_text("0x1af4\n")  # a virtio device: not an accelerator
    assert platforms.default_platforms(str(tmp_path)) == "cpu"
    (tpu / "vendor").write_text("0x1ae0\n")  # Google's PCI vendor id: a TPU chip
    assert platforms.default_platforms(str(tmp_path)) is None


def test_only_the_no_driver_notices_are_filtered(capfd):
    with platforms.without_no_gpu_notices():
        os.write(2, b"I0000 00:00:1.0  1 cudart_stub.cc:31] Could not find cuda drivers on "
                    b"your machine, GPU will not be used.\nsomething else\n")
    assert capfd.readouterr().err == "something else\n"


@pytest.mark.slow
def test_one_h100_host_has_no_network_traffic_and_compiles_the_eval_step():
    config = config_lib.load_config(TINY_CONFIG, [*MICRO, "mesh.data=2", "mesh.fsdp=4"])
    report = aot.rehearse(config, "h100:8")
    assert report["hosts"] == 1 and set(report["steps"]) == {"train", "eval"}
    for step in report["steps"].values():
        assert step["collectives"] and {r["network"] for r in step["collectives"]} == {"ICI"}
        assert step["fits"] is True
    assert aot_gpu.parse("h100:8") == ("h100", 1, 8)
    text = aot.format_report(report)
    assert "[eval step]" in text and text.count("of 80.00 GiB HBM") == 2
