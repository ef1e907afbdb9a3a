"""What the project decides from the machine it runs on, as functions of that machine's facts.

`DeviceFacts.of_this_machine()` reads the facts once (the GPUs' compute capabilities, the CPU's
flags); each choice below is a function of them, so that a GPU of any kind can be tested on a
machine without one.
"""

import dataclasses
import functools

import tensorflow as tf

# Compute capabilities of the tensor cores' reduced precisions (NVIDIA): bfloat16 from Ampere
# (8.0), float16 from Volta (7.0). CPUs: bfloat16 where oneDNN has bf16 instructions; elsewhere
# it is emulated and slower than float32.
BFLOAT16_CAPABILITY = (8, 0)
FLOAT16_CAPABILITY = (7, 0)
CPU_BFLOAT16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    """The facts the choices below read.

    Attributes:
        gpus: the compute capability (major, minor) of each visible GPU; () on a CPU-only
            machine.
        cpu_flags: the CPU's feature flags (/proc/cpuinfo), lower case.
    """

    gpus: tuple = ()
    cpu_flags: frozenset = frozenset()

    @classmethod
    def of_this_machine(cls, cpuinfo="/proc/cpuinfo"):
        return _facts(cpuinfo)


@functools.lru_cache(maxsize=4)
def _facts(cpuinfo):
    gpus = tuple(tuple(tf.config.experimental.get_device_details(gpu).get(
        "compute_capability", (0, 0))) for gpu in tf.config.list_physical_devices("GPU"))
    try:
        with open(cpuinfo) as f:
            flags = frozenset(next((line for line in f if line.startswith("flags")),
                                   "").split())
    except OSError:
        flags = frozenset()
    return DeviceFacts(gpus, flags)


def lrn_implementation(facts):
    """LRN's kernel: TensorFlow's own (cuDNN's on a GPU), or the fused CPU path (alexnet_tf.lrn)
    where no GPU is visible."""
    return "tf" if facts.gpus else "fused"


def dense_implementation(facts):
    """fc6-fc8's training matmul: TensorFlow's (cuBLAS) on a GPU, Eigen's GEMM on a CPU
    (alexnet_tf.layers.Dense)."""
    return "tf" if facts.gpus else "eigen"


def mixed_precision(facts):
    """The reduced precision the machine computes natively: "bfloat16", "float16" or "none".
    With several GPUs, the least capable decides: every replica runs the same policy."""
    if facts.gpus:
        capability = min(facts.gpus)
        if capability >= BFLOAT16_CAPABILITY:
            return "bfloat16"
        return "float16" if capability >= FLOAT16_CAPABILITY else "none"
    return "bfloat16" if facts.cpu_flags & CPU_BFLOAT16_FLAGS else "none"


def replica_devices(facts, cpu_devices):
    """The devices --strategy=auto trains on: every visible GPU, else the logical CPU devices
    asked for (`cpu_devices`, their names). More than one: MirroredStrategy over them; one:
    TensorFlow's default strategy."""
    if facts.gpus:
        return [f"/gpu:{i}" for i in range(len(facts.gpus))]
    return list(cpu_devices)


def decode_device(facts):
    """Where an export decodes JPEG/PNG bytes: the CPU on every machine. TensorFlow has no GPU
    kernel for PNG, and one JPEG at a time gains nothing on a GPU."""
    del facts  # the same everywhere; a function of the facts like every other choice
    return "/cpu:0"
