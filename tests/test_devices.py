"""The choices made from the machine's facts (alexnet_tf.devices), for GPUs this machine lacks."""

import dataclasses

import keras
import pytest

from alexnet_tf import devices, layers, lrn
from alexnet_tf import strategy as strategy_lib
from alexnet_tf.devices import DeviceFacts

V100, A100, H100 = (7, 0), (8, 0), (9, 0)
CPUS = ["/device:CPU:0", "/device:CPU:1"]
MACHINES = {
    "V100": DeviceFacts(gpus=(V100,)),
    "A100": DeviceFacts(gpus=(A100,)),
    "H100": DeviceFacts(gpus=(H100,)),
    "8xH100": DeviceFacts(gpus=(H100,) * 8),
    "V100+A100": DeviceFacts(gpus=(V100, A100)),
    "Kepler": DeviceFacts(gpus=((3, 7),)),
    "CPU with AMX": DeviceFacts(cpu_flags=frozenset({"avx512f", "amx_bf16", "amx_tile"})),
    "CPU with AVX2": DeviceFacts(cpu_flags=frozenset({"avx2", "fma"})),
}


@pytest.mark.parametrize("machine, precision, lrn_kernel, dense_kernel, replicas", [
    ("V100", "float16", "tf", "tf", ["/gpu:0"]),
    ("A100", "bfloat16", "tf", "tf", ["/gpu:0"]),
    ("H100", "bfloat16", "tf", "tf", ["/gpu:0"]),
    ("8xH100", "bfloat16", "tf", "tf", [f"/gpu:{i}" for i in range(8)]),
    # Every replica runs one policy: the least capable GPU decides.
    ("V100+A100", "float16", "tf", "tf", ["/gpu:0", "/gpu:1"]),
    ("Kepler", "none", "tf", "tf", ["/gpu:0"]),
    ("CPU with AMX", "bfloat16", "fused", "eigen", CPUS),
    ("CPU with AVX2", "none", "fused", "eigen", CPUS),
])
def test_each_choice_follows_the_machine(machine, precision, lrn_kernel, dense_kernel, replicas):
    facts = MACHINES[machine]
    assert devices.mixed_precision(facts) == precision
    assert devices.lrn_implementation(facts) == lrn_kernel
    assert devices.dense_implementation(facts) == dense_kernel
    assert devices.replica_devices(facts, CPUS) == replicas
    gpu = bool(facts.gpus)
    # XLA and the batches copied ahead: GPUs only; more steps per call on GPUs.
    assert devices.jit_compile(facts) is gpu
    assert devices.steps_per_execution(facts, 5000) == (20 if gpu else 10)
    assert devices.input_device(facts, strategy_copies=False) == ("/gpu:0" if gpu else None)
    assert devices.input_device(facts, strategy_copies=True) is None


@pytest.mark.parametrize("steps_per_epoch, replicas, expected", [
    (5000, 1, 20), (150, 1, 15), (7, 1, 7), (97, 1, 1), (5000, 2, 1)])
def test_steps_per_call_divide_the_epoch_and_are_one_with_several_replicas(
        steps_per_epoch, replicas, expected):
    # An epoch must end at a call's end; Keras 3 fails calls of several steps with several
    # replicas.
    assert devices.steps_per_execution(MACHINES["H100"], steps_per_epoch, replicas) == expected


@pytest.mark.parametrize("onednn, max_isa, precision", [
    (True, "", "bfloat16"),
    (True, "AVX512_CORE_AMX", "bfloat16"),
    (True, "AVX512_CORE_BF16", "bfloat16"),
    # Capped below the bf16 instructions, or Eigen's kernels: bf16 would be emulated.
    (True, "AVX2", "none"),
    (True, "AVX512_CORE", "none"),
    (False, "", "none"),
])
def test_a_cpu_computes_bfloat16_only_where_onednn_may_use_its_instructions(
        onednn, max_isa, precision):
    facts = dataclasses.replace(MACHINES["CPU with AMX"], onednn=onednn, onednn_max_isa=max_isa)
    assert devices.mixed_precision(facts) == precision


@pytest.mark.parametrize("machine, onednn, gradients", [
    ("CPU with AVX2", False, "forward"),  # Eigen's backprop kernels
    ("CPU with AVX2", True, "tf"),
    ("CPU with AMX", True, "tf"),
    ("H100", False, "tf"),
])
def test_convolution_gradients_are_forward_convolutions_only_on_eigen(machine, onednn, gradients):
    facts = dataclasses.replace(MACHINES[machine], onednn=onednn)
    assert devices.conv_gradients(facts) == gradients


def test_the_onednn_facts_are_read_from_the_environment(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"  # a file of its own: facts are read once per file
    cpuinfo.write_text("flags\t\t: avx2 amx_bf16\n")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", " avx2")
    facts = DeviceFacts.of_this_machine(str(cpuinfo))
    assert facts.onednn_max_isa == "AVX2"
    assert devices.mixed_precision(facts) == "none"


def test_this_machines_facts_are_read_from_its_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512_bf16\n")
    facts = DeviceFacts.of_this_machine(str(cpuinfo))
    assert "avx512_bf16" in facts.cpu_flags and "fpu" in facts.cpu_flags
    assert DeviceFacts.of_this_machine(str(tmp_path / "missing")).cpu_flags == frozenset()


@pytest.mark.parametrize("machine, fused_lrn, eigen_dense, policy", [
    ("H100", False, False, "bfloat16"),
    ("CPU with AVX2", True, True, "none"),
    ("CPU with AMX", True, True, "bfloat16"),
])
def test_the_layers_and_the_policy_take_their_choice_from_the_facts(
        machine, fused_lrn, eigen_dense, policy, monkeypatch):
    facts = MACHINES[machine]
    monkeypatch.setattr(DeviceFacts, "of_this_machine", classmethod(lambda cls, *a: facts))
    norm = lrn.LocalResponseNormalization.from_preset("paper")
    norm.build((None, 8, 8, 96))
    assert (norm._fused is not None) is fused_lrn
    dense = layers.Dense(4)
    dense.build((None, 8))
    assert dense._eigen is eigen_dense
    assert strategy_lib.native_mixed_precision() == policy
    keras.config.set_dtype_policy("float32")
