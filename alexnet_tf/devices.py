"""What the project decides from the machine it runs on, as functions of that machine's facts.

`DeviceFacts.of_this_machine()` reads the facts once (the GPUs' compute capabilities, the CPU's
flags); each choice below is a function of them, so that a GPU of any kind can be tested on a
machine without one.
"""

import dataclasses
import functools
import os

import tensorflow as tf

from alexnet_tf.keras_compat import onednn_enabled

# Compute capabilities of the tensor cores' reduced precisions (NVIDIA): bfloat16 from Ampere
# (8.0), float16 from Volta (7.0). CPUs: bfloat16 where oneDNN has bf16 instructions; elsewhere
# it is emulated and slower than float32.
BFLOAT16_CAPABILITY = (8, 0)
FLOAT16_CAPABILITY = (7, 0)
CPU_BFLOAT16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
# The values of oneDNN's ONEDNN_MAX_CPU_ISA that still let it use bf16 instructions (any lower
# cap, such as AVX2 or AVX512_CORE, leaves bf16 emulated).
BFLOAT16_ISA_CAPS = frozenset({
    "", "ALL", "DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
    "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16",
    "AVX10_2_512", "AVX10_2_512_AMX_2"})


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    """The facts the choices below read.

    Attributes:
        gpus: the compute capability (major, minor) of each visible GPU; () on a CPU-only
            machine.
        cpu_flags: the CPU's feature flags (/proc/cpuinfo), lower case.
        onednn: whether TensorFlow runs its oneDNN CPU kernels (TF_ENABLE_ONEDNN_OPTS).
        onednn_max_isa: the instruction set oneDNN is capped at (ONEDNN_MAX_CPU_ISA, upper
            case; "" when not capped).
    """

    gpus: tuple = ()
    cpu_flags: frozenset = frozenset()
    onednn: bool = True
    onednn_max_isa: str = ""

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
    return DeviceFacts(gpus, flags, onednn_enabled(),
                       os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper())


def lrn_implementation(facts):
    """LRN's kernel: TensorFlow's own (cuDNN's on a GPU), or the fused CPU path (alexnet_tf.lrn)
    where no GPU is visible."""
    return "tf" if facts.gpus else "fused"


def dense_implementation(facts):
    """fc6-fc8's training matmul: TensorFlow's (cuBLAS) on a GPU, Eigen's GEMM on a CPU
    (alexnet_tf.layers.Dense)."""
    return "tf" if facts.gpus else "eigen"


def conv_gradients(facts):
    """How the convolutions' training gradients are computed: "tf" (TensorFlow's backprop
    kernels), or "forward" as forward convolutions (`layers.conv2d_forward_gradients`) on a CPU
    without oneDNN, where Eigen's backprop kernels take about twice as long as forward
    convolutions doing the same work (BENCHMARKS.md); oneDNN's are fast."""
    return "forward" if not facts.gpus and not facts.onednn else "tf"


def mixed_precision(facts):
    """The reduced precision the machine computes natively: "bfloat16", "float16" or "none".
    With several GPUs, the least capable decides: every replica runs the same policy."""
    if facts.gpus:
        capability = min(facts.gpus)
        if capability >= BFLOAT16_CAPABILITY:
            return "bfloat16"
        return "float16" if capability >= FLOAT16_CAPABILITY else "none"
    # A CPU computes bf16 natively only through oneDNN, and only when oneDNN may use the bf16
    # instructions: with its kernels off (Eigen's) or capped below them, bf16 is emulated.
    native = (facts.cpu_flags & CPU_BFLOAT16_FLAGS and facts.onednn
              and facts.onednn_max_isa in BFLOAT16_ISA_CAPS)
    return "bfloat16" if native else "none"


def replica_devices(facts, cpu_devices):
    """The devices --strategy=auto trains on: every visible GPU, else the logical CPU devices
    asked for (`cpu_devices`, their names). More than one: MirroredStrategy over them; one:
    TensorFlow's default strategy."""
    if facts.gpus:
        return [f"/gpu:{i}" for i in range(len(facts.gpus))]
    return list(cpu_devices)


def jit_compile(facts):
    """Whether training steps compile with XLA: on GPUs, where it fuses the step's element-wise
    work (2.5x on an H200, BENCHMARKS.md); not on CPUs, where XLA's convolutions are slower
    than oneDNN's and Eigen's (the README recipe: 441 img/s with XLA, about 1,500 without)."""
    return bool(facts.gpus)


# Training steps per call from Python: Keras waits for the device after each call (it turns the
# logs into Python floats) and runs the callbacks, so one step per call leaves a GPU idle while
# Python prepares the next, and costs a CPU the callbacks' time: about 5% of the README recipe's
# 40 ms steps on 2 cores (benchmarks/train_overhead.py).
GPU_STEPS_PER_EXECUTION = 20
CPU_STEPS_PER_EXECUTION = 10


def steps_per_execution(facts, steps_per_epoch, replicas=1):
    """Training steps per `fit` call: up to GPU_STEPS_PER_EXECUTION on GPUs and
    CPU_STEPS_PER_EXECUTION on CPUs; 1 with several replicas (Keras 3.15's calls of several
    steps fail under MirroredStrategy with more than one replica: "You must feed a value for
    placeholder tensor 'while/body/.../cond/Placeholder'"). A divisor of `steps_per_epoch`, so
    that every epoch ends at a call's end (Keras would run the last call's steps past it)."""
    most = GPU_STEPS_PER_EXECUTION if facts.gpus else CPU_STEPS_PER_EXECUTION
    most = most if replicas == 1 else 1
    return max(n for n in range(1, min(most, steps_per_epoch) + 1) if steps_per_epoch % n == 0)


def input_device(facts, strategy_copies):
    """Where the input pipeline copies each batch ahead of its step: the GPU when TensorFlow's
    default strategy trains on one (it would copy each batch inside the step, the GPU waiting);
    None on a CPU, or when the strategy copies batches to its replicas' devices itself
    (`strategy_copies`: MirroredStrategy and the others)."""
    return "/gpu:0" if facts.gpus and not strategy_copies else None


def decode_device(facts):
    """Where an export decodes JPEG/PNG bytes: the CPU on every machine. TensorFlow has no GPU
    kernel for PNG, and one JPEG at a time gains nothing on a GPU."""
    del facts  # the same everywhere; a function of the facts like every other choice
    return "/cpu:0"
