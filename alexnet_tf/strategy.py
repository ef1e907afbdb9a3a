"""A run's place in the process and on the machine: the process-wide settings (seed, dtype
policy), the tf.distribute strategy over the machine's devices, and which worker is the chief."""

import os

import keras
import tensorflow as tf
from absl import logging

from alexnet_tf import devices
from alexnet_tf.train_config import TrainingError


def set_up_process(config):
    """Every process-wide setting of a run, here and nowhere else: the random seed, Keras'
    dtype policy, and the logical CPU devices and distribution strategy. Returns the strategy."""
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
    mixed_precision = config.mixed_precision
    if mixed_precision == "auto":
        mixed_precision = native_mixed_precision()
        logging.info("--mixed_precision=auto: %s", mixed_precision)
    if mixed_precision != "none":
        keras.config.set_dtype_policy(f"mixed_{mixed_precision}")
    strategy = make_strategy(config)
    if config.batch_size % strategy.num_replicas_in_sync:
        raise TrainingError(f"batch_size {config.batch_size} is not divisible by the "
                            f"{strategy.num_replicas_in_sync} replicas")
    return strategy


def native_mixed_precision(cpuinfo="/proc/cpuinfo"):
    """The reduced precision this machine computes natively: "bfloat16", "float16" or "none".

    GPUs: bfloat16 from compute capability 8.0 (Ampere), float16 on 7.x (Volta/Turing tensor
    cores). CPUs: bfloat16 where oneDNN has bf16 instructions (AMX or AVX512_BF16, e.g. Intel
    Sapphire Rapids, AMD Zen 4), its kernels are on and ONEDNN_MAX_CPU_ISA does not cap them
    below those; elsewhere bf16 is emulated and slower than float32, so "none".
    """
    return devices.mixed_precision(devices.DeviceFacts.of_this_machine(cpuinfo))


def make_strategy(config):
    """Builds the tf.distribute strategy named by config.strategy."""
    if config.cpu_replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * config.cpu_replicas)
        except RuntimeError:
            pass  # already initialised by an earlier run in this process; keep what is there
    # TPU and multi-worker set-up must come before anything initialises the TF context.
    if config.strategy == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if config.strategy == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise TrainingError("--strategy=multi_worker needs the TF_CONFIG environment variable")
        return tf.distribute.MultiWorkerMirroredStrategy()
    facts = devices.DeviceFacts.of_this_machine()
    if config.strategy == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if facts.gpus else "/cpu:0")
    # Every visible GPU; on a CPU-only machine the logical CPUs asked for.
    replicas = devices.replica_devices(
        facts, [d.name for d in tf.config.list_logical_devices("CPU")])
    if config.strategy == "mirrored":
        return tf.distribute.MirroredStrategy(replicas)
    # auto: mirrored over several devices.
    if len(replicas) > 1:
        return tf.distribute.MirroredStrategy(replicas)
    # One device: TensorFlow's default strategy, which places ops on the GPU when there is one.
    # Mirrored/OneDevice strategies feed even one device through per-device tf.data iterators
    # with autotuning always on, whose destruction waits for the autotuner (data.Options'
    # `autotune` says why that costs each epoch).
    return tf.distribute.get_strategy()


def is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    return resolver.task_type in (None, "chief") or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())
