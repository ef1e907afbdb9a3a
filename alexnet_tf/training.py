"""Training: strategy set-up, the paper's optimisation recipe, fault tolerance and logging.

`train_and_evaluate(config, workdir)` is the library entry point; `train.py` only turns flags
into a `TrainConfig` and calls it.
"""

import contextlib
import dataclasses
import json
import math
import os
import re
import time
import warnings

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from alexnet_tf import backup as backup_lib
from alexnet_tf import data, devices, keras_compat, layers, model as model_lib, preprocessing
from alexnet_tf import weights
from alexnet_tf.lrn import LRN_PRESETS
from alexnet_tf.rundir import RunDir



def _setting(default, help_text, choices=None):
    """A TrainConfig field: its default, its help and its choices (None: any value)."""
    return dataclasses.field(default=default, metadata={"help": help_text, "choices": choices})


class TrainingError(RuntimeError):
    """A training run that cannot go on (bad settings, NaN loss); one-line message."""


PCA_SAMPLE = 1000  # training images whose pixels give --pca=dataset's eigen-pairs


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run. Defaults are the paper's ImageNet recipe (§5) where it has one."""

    # Each setting: its default, what it does (train.py's flag help) and, for a choice, the
    # values it takes (train.py's flag refuses others, validate() too).
    dataset: str = _setting(
        "fashion_mnist", "tfds:<name> | tfrecord:<glob> | folder:<path> | fashion_mnist[:<dir>] "
        "| mnist[:<dir>] (see alexnet_tf.data).")
    data_dir: str | None = _setting(None, "TFDS data directory.")
    variant: str = _setting("paper", "AlexNet variant (see alexnet_tf.AlexNet).",
                            model_lib.VARIANTS)
    num_classes: int | None = _setting(None, "Classes of fc8; default: the dataset's.")
    image_size: int | None = _setting(
        None, "Crop size fed to the model; default: the variant's (paper and single_tower 227, "
        "one_weird_trick 224, cifar and small 32), or the images' own for small images such as "
        "MNIST's 28.")
    lrn: str = _setting("paper", "LRN preset, or none.", (*LRN_PRESETS, "none"))
    init: str = _setting("paper", "Weight initialisation (paper §5, BVLC Caffe, Keras defaults).",
                         model_lib.INITS)
    dropout: float = _setting(0.5, "Dropout rate of fc6/fc7 (paper §4.2).")
    batch_size: int = _setting(128, "Global batch size, split across replicas (paper §5).")
    epochs: int = _setting(90, "Training epochs (paper §5: roughly 90).")
    steps_per_epoch: int | None = _setting(
        None, "Steps per epoch; default: one pass over the training split.")
    eval_steps: int | None = _setting(
        None, "Validation batches per evaluation; default: the whole split.")
    optimizer: str = _setting("sgd", "Optimizer.", ("sgd", "adam"))
    learning_rate: float = _setting(0.01, "Base learning rate (paper §5).")
    momentum: float = _setting(0.9, "SGD momentum (paper §5).")
    weight_decay: float = _setting(
        5e-4, "L2 weight decay on kernels, coupled with momentum as in the paper's update rule.")
    schedule: str = _setting(
        "plateau", "Learning-rate schedule; plateau divides by --lr_decay when validation top-1 "
        "stops improving (paper §5).", ("plateau", "step", "cosine", "constant"))
    lr_decay: float = _setting(0.1, "Factor of each learning-rate drop (plateau and step).")
    plateau_patience: int = _setting(
        3, "Epochs without a better validation top-1 before a drop.")
    max_lr_drops: int = _setting(
        3, "At most this many plateau drops (paper §5: reduced three times).")
    step_size: int = _setting(
        100_000, "Iterations between drops for --schedule=step (BVLC solver).")
    warmup_epochs: float = _setting(0.0, "Linear warm-up epochs (cosine).")
    scale_lr_batch: int | None = _setting(
        None, "Scale the learning rate by batch_size / this (linear scaling rule).")
    crop: str = _setting("paper", "Training crop for photos; small images are always padded and "
                         "cropped.", ("paper", "inception"))
    pad: int | None = _setting(
        None, "Small images: zero padding of the random crop (default image_size // 8; 0: no "
        "crop).")
    pca: str = _setting("imagenet", "PCA lighting eigen-pairs: ImageNet's, your training set's "
                        "(prepared: sources: all of its pixels, from prepare.py; others: 1,000 "
                        "images), or no lighting.", ("imagenet", "dataset", "none"))
    max_pixels: int = _setting(
        preprocessing.MAX_PIXELS, "Encoded images whose header declares more pixels are skipped "
        "and counted, not decoded (decompression bombs); export.py's default budget.")
    cache: bool = _setting(False, "Cache decoded records in memory (small datasets).")
    data_service: str | None = _setting(
        None, "grpc://HOST:PORT of a tf.data service dispatcher (python -m "
        "alexnet_tf.data_service): the training pipeline runs on its workers, which log the "
        "images they skip; validation runs here.")
    shuffle_buffer: int = _setting(10_000, "Shuffle buffer size in records.")
    one_based_labels: bool = _setting(False, "TFRecord labels start at 1.")
    strategy: str = _setting("auto", "tf.distribute strategy; auto: every visible GPU, else the "
                             "CPU.", ("auto", "mirrored", "multi_worker", "one_device", "tpu"))
    cpu_replicas: int = _setting(
        1, "Split the CPU into this many logical devices (exercises mirrored on CPU).")
    mixed_precision: str = _setting(
        "none", "auto: bfloat16 or float16 where the GPU or CPU computes it natively, else none.",
        ("none", "float16", "bfloat16", "auto"))
    jit_compile: bool = _setting(False, "Compile the train step with XLA.")
    seed: int | None = _setting(
        None, "Seed for initialisation, shuffling and augmentation (deterministic pipeline).")
    ten_crop_eval: bool = _setting(
        False, "Final evaluation with 10-crop averaging (paper §4.1).")
    checkpoint_every_steps: int | None = _setting(
        None, "Also back up every N steps (default: every epoch).")
    start_over: bool = _setting(
        False, "Discard the workdir's backup, history and preprocessing and train from the first "
        "epoch (default: resume from them).")
    init_from: str | None = _setting(
        None, "Start from these weights: bvlc_alexnet.npy (Caffe), a torchvision .pth, or a "
        ".keras checkpoint; fc8 is new when the class count differs.")
    trainable: str = _setting(
        "all", "all, or the comma-separated layers to train (e.g. fc6,fc7,fc8); others frozen.")
    trust_weights: bool = _setting(
        False, "Allow unpickling a Caffe .npy file (a pickle can run code; only for files you "
        "trust).")

    def validate(self):
        checks = [
            (getattr(self, field.name) in field.metadata["choices"],
             f"unknown {field.name} {getattr(self, field.name)!r}; choose one of "
             f"{', '.join(field.metadata['choices'])}")
            for field in dataclasses.fields(self) if field.metadata["choices"]
        ] + [
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
            (self.epochs > 0, f"epochs must be positive, got {self.epochs}"),
            (self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}"),
            (self.pad is None or self.pad >= 0, f"pad must be >= 0, got {self.pad}"),
            (self.max_pixels > 0, f"max_pixels must be positive, got {self.max_pixels}"),
            (self.cpu_replicas >= 1, f"cpu_replicas must be >= 1, got {self.cpu_replicas}"),
            (not self.init_from or os.path.exists(self.init_from),
             f"--init_from={self.init_from}: no such file"),
            (not self.data_service or re.fullmatch(r"grpc://[^:/]+:\d+", self.data_service),
             f"--data_service={self.data_service}: give the dispatcher as grpc://HOST:PORT"),
            (not self.data_service or self.strategy != "multi_worker",
             "--data_service works with one trainer (the default strategy or mirrored), not "
             "--strategy=multi_worker: several trainers would each read a whole epoch"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(message)
        if self.init_from:
            try:
                weights.check_fits(self.init_from, self.variant, self.lrn)
            except weights.WeightsError as e:
                raise TrainingError(str(e)) from None
        data.parse_source(self.dataset)

    def to_json(self, path):
        with open(path, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2)


# What a resumed run must share with the run it resumes: these settings shape the model, its
# optimizer's state (saved with the weights) or the data, whose preprocessing the run keeps.
RESUME_SETTINGS = ("dataset", "variant", "num_classes", "image_size", "lrn", "crop", "pad", "pca",
                   "max_pixels", "one_based_labels", "optimizer", "trainable", "mixed_precision")


def native_mixed_precision(cpuinfo="/proc/cpuinfo"):
    """The reduced precision this machine computes natively: "bfloat16", "float16" or "none".

    GPUs: bfloat16 from compute capability 8.0 (Ampere), float16 on 7.x (Volta/Turing tensor
    cores). CPUs: bfloat16 where oneDNN has bf16 instructions (AMX or AVX512_BF16, e.g. Intel
    Sapphire Rapids, AMD Zen 4); elsewhere bf16 is emulated and slower than float32, so "none".
    """
    return devices.mixed_precision(devices.DeviceFacts.of_this_machine(cpuinfo))


# --------------------------------------------------------------------------------------------
# Strategy


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
    # with autotuning always on, and in TensorFlow 2.21 destroying those (Keras does it before
    # every validation) waits for the autotuner's next wake-up, a large part of each epoch of
    # the Fashion-MNIST recipe (BENCHMARKS.md; data.make_dataset's `autotune`).
    return tf.distribute.get_strategy()


def _is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    return resolver.task_type in (None, "chief") or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())


# --------------------------------------------------------------------------------------------
# Callbacks


class DivideOnPlateau(keras.callbacks.Callback):
    """Paper §5: multiply the learning rate by `factor` (the paper's 0.1: divide by 10) when
    validation top-1 stops improving for `patience` epochs.

    At most `max_drops` divisions (the paper stopped after three). Its counters (`STATE`) are
    saved with each backup, so that a resumed run continues with them.
    """

    STATE = ("best", "wait", "drops")

    def __init__(self, factor=0.1, patience=3, max_drops=3, monitor="val_top1"):
        super().__init__()
        self.factor, self.patience, self.max_drops = factor, patience, max_drops
        self.monitor = monitor
        self.best, self.wait, self.drops = -math.inf, 0, 0

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        if value > self.best:
            self.best, self.wait = float(value), 0
        else:
            self.wait += 1
            if self.wait >= self.patience and self.drops < self.max_drops:
                lr = float(self.model.optimizer.learning_rate) * self.factor
                self.model.optimizer.learning_rate = lr
                self.drops += 1
                self.wait = 0
                logging.info("Epoch %d: validation top-1 stopped improving; learning rate -> %g "
                             "(drop %d of at most %d)", epoch + 1, lr, self.drops, self.max_drops)


class StopOnNaN(keras.callbacks.Callback):
    """Stops at the first NaN/inf loss and remembers the step, so the run can say where."""

    def __init__(self, steps_per_epoch):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0
        self.bad_step = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            self.bad_step = (self.epoch, batch, self.epoch * self.steps_per_epoch + batch + 1)
            self.model.stop_training = True


class EpochReport(keras.callbacks.Callback):
    """One line per epoch with images/s, the learning rate and skipped images (unreadable, or
    over the pixel budget); adds `learning_rate`
    and `images_per_sec` to the logs so CSVLogger and TensorBoard record them."""

    def __init__(self, global_batch, steps_per_epoch, epochs, skipped=None, verbose=True):
        super().__init__()
        self.verbose = verbose
        self.global_batch, self.steps_per_epoch, self.epochs = global_batch, steps_per_epoch, epochs
        self.skipped = skipped
        self.start = None

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        elapsed = time.perf_counter() - self.start
        rate = self.global_batch * self.steps_per_epoch / elapsed
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        logs["images_per_sec"] = rate
        parts = [f"epoch {epoch + 1}/{self.epochs}"]
        for key in ("loss", "top1", "top5", "val_loss", "val_top1", "val_top5"):
            if key in logs:
                parts.append(f"{key} {logs[key]:.4f}")
        parts.append(f"lr {logs['learning_rate']:.3g}")
        parts.append(f"{rate:.0f} img/s")
        parts.append(f"{elapsed:.0f}s")
        if self.skipped is not None:
            skipped = int(self.skipped.numpy())
            logs["skipped_images"] = skipped
            parts.append(f"skipped {skipped} unreadable or oversized images so far")
        if self.verbose:
            print(" - ".join(parts), flush=True)


# --------------------------------------------------------------------------------------------
# The run


def _learning_rate(config, steps_per_epoch):
    lr = config.learning_rate
    if config.scale_lr_batch:
        lr *= config.batch_size / config.scale_lr_batch
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if config.schedule == "cosine":
        total = config.epochs * steps_per_epoch
        if warmup:
            return keras.optimizers.schedules.CosineDecay(
                0.0, total - warmup, warmup_target=lr, warmup_steps=warmup)
        return keras.optimizers.schedules.CosineDecay(lr, total)
    if config.schedule == "step":  # Caffe "step": lr * gamma^floor(iter / stepsize)
        return keras.optimizers.schedules.ExponentialDecay(
            lr, config.step_size, config.lr_decay, staircase=True)
    return lr  # constant, or plateau (changed by DivideOnPlateau)


def _optimizer(config, steps_per_epoch):
    lr = _learning_rate(config, steps_per_epoch)
    if config.optimizer == "adam":
        return keras.optimizers.Adam(lr)
    return keras.optimizers.SGD(lr, momentum=config.momentum)


def _add_weight_decay(model, weight_decay):
    # Paper §5's update v <- 0.9 v - 0.0005 eps w - eps grad is momentum SGD on loss +
    # (0.0005 / 2) ||w||^2. Kernels only: Caffe's reference model does not decay biases.
    if not weight_decay:
        return
    regularizer = keras.regularizers.L2(weight_decay / 2)
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is not None and layer.trainable:  # frozen layers: a constant, skip it
            kernel.regularizer = regularizer


def _write_image_grid(run, dataset, config):
    """Logs a grid of augmented training images to TensorBoard (de-normalised for viewing)."""
    images, _ = next(iter(dataset.take(1)))
    stage = preprocessing.InputStage(config)
    images = preprocessing.denormalize(stage(images[:16], training=True), config)
    with tf.summary.create_file_writer(os.path.join(run.tensorboard, "train")).as_default():
        tf.summary.image("augmented_training_images", tf.clip_by_value(images / 255.0, 0, 1),
                         step=0, max_outputs=16)


def _dummy_batch(model, strategy, num_classes):
    """One global batch of zeros of the model's input shape (for building before fit)."""
    replicas = strategy.num_replicas_in_sync
    return (tf.zeros([replicas, *model.input_shape[1:]]),
            tf.zeros([replicas], tf.int32) % num_classes)


def build_model(config, num_classes, image_size, channels):
    """The AlexNet of a config, not compiled (create_model compiles it)."""
    return model_lib.AlexNet(
        num_classes=num_classes,
        variant=config.variant,
        input_shape=(image_size, image_size, channels),
        lrn=None if config.lrn == "none" else config.lrn,
        init=config.init,
        dropout=config.dropout,
    )


@contextlib.contextmanager
def _validation_runs_out_quietly():
    """The validation pipeline's length is unknown (corrupt images are filtered out), so Keras
    learns it by running out of data and warns "Your input ran out of data" after the first
    evaluation: expected here (the training pipeline repeats forever), so not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        yield


# --------------------------------------------------------------------------------------------
# The run, step by step


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


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a run reads: the training source's description (read once), its classes and the
    PreprocessConfig, fixed for the whole run (and saved with it)."""

    config: TrainConfig
    info: data.DatasetInfo
    num_classes: int
    class_names: list
    preprocess: preprocessing.PreprocessConfig

    def dataset(self, split, training, ten_crop=False, service=True):
        """(dataset, DatasetInfo) of a split: a plain dataset of global batches of uint8 crops,
        which the model's steps pass through the InputStage first (`run_input_stage`). Keras
        splits it across the replicas and, with several workers, shards it (by file where it
        can, else by record); Keras 3's fit() cannot take distribute_datasets_from_function's
        PerReplica. With --data_service a training pipeline runs on its workers, unless
        `service` is False (one batch for the image grid: a service job would make the workers
        start on a whole epoch)."""
        config = self.config
        return data.make_dataset(
            config.dataset, split, training, config.batch_size, self.preprocess,
            data_dir=config.data_dir, seed=config.seed, cache=config.cache,
            shuffle_buffer=config.shuffle_buffer, repeat=training, ten_crop=ten_crop,
            num_classes=self.num_classes, one_based_labels=config.one_based_labels,
            device_stage=True, data_service=config.data_service if training and service else None)


def _source_args(config):
    """load_source's arguments that come from the run's flags."""
    return dict(data_dir=config.data_dir, num_classes=config.num_classes,
                one_based_labels=config.one_based_labels)


def check_splits(config):
    """data.DataError before anything is trained when a split cannot give what the run asks of
    it: one global batch of readable training images, and the validation images of
    --eval_steps batches (at least one)."""
    data.check_split(config.dataset, "train", config.batch_size,
                     f"one training batch (--batch_size={config.batch_size})",
                     config.max_pixels, **_source_args(config))
    if config.eval_steps:
        needed = (config.eval_steps - 1) * config.batch_size + 1
        what = f"--eval_steps={config.eval_steps} at --batch_size={config.batch_size}"
    else:
        needed, what = 1, "validation"
    data.check_split(config.dataset, "validation", needed, what, config.max_pixels,
                     **_source_args(config))


def check_resumable(config, run):
    """TrainingError, before anything is read or loaded, when the workdir holds a run whose
    settings of the model or the data (RESUME_SETTINGS) differ from `config`'s: resuming would
    load weights of another shape or train on other data."""
    if config.start_over or not os.path.exists(run.config):
        return
    try:
        with open(run.config) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise TrainingError(f"cannot resume: {run.config} is unreadable ({e})") from None
    differ = [f"--{name}={getattr(config, name)} (the run has {saved[name]})"
              for name in RESUME_SETTINGS if name in saved and saved[name] != getattr(config, name)]
    if differ:
        raise TrainingError(
            f"cannot resume {run.path} with other settings: {', '.join(differ)}; give another "
            "--workdir for a new run, or --start_over to discard this one's backup, history and "
            "preprocessing and train it from the first epoch")


def _preprocess_config(config, info, run):
    """The run's PreprocessConfig, from everything that decides it: the images, the variant, the
    weights it starts from and the flags. A resumed run keeps the one it started with."""
    if os.path.exists(run.preprocessing):
        return preprocessing.PreprocessConfig.from_json(run.preprocessing)
    pre = data.default_preprocess_config(
        info, model_lib.DEFAULT_IMAGE_SIZE[config.variant], config.image_size)
    changes = {"max_pixels": config.max_pixels}
    if not info.small_images:
        changes["crop"] = config.crop
    elif config.pad is not None:
        changes["pad"] = config.pad
    convention = config.init_from and weights.preprocess_config_for(config.init_from)
    if convention is not None and pre.channels == 3:
        logging.info("%s expects %s input with mean %s and std %s", config.init_from,
                     "BGR" if convention.bgr else "RGB", convention.mean, convention.std)
        changes.update(mean=convention.mean, std=convention.std, bgr=convention.bgr)
    if config.pca == "none":
        changes.update(eigval=None, eigvec=None)
    elif config.pca == "dataset" and info.prepared is not None and "pca" in info.prepared:
        pca = info.prepared["pca"]
        logging.info("PCA lighting eigen-pairs of the %s training pixels prepare.py counted",
                     f"{pca['pixels']:,}")
        changes["eigval"] = tuple(pca["eigval"])
        changes["eigvec"] = tuple(tuple(row) for row in pca["eigvec"])
    elif config.pca == "dataset" and pre.channels == 3:
        images, skips = data.decoded_sample(config.dataset, PCA_SAMPLE, config.max_pixels,
                                            **_source_args(config))
        logging.info("PCA lighting eigen-pairs from %d training images (skipped: %s)",
                     len(images), skips.describe())
        changes["eigval"], changes["eigvec"] = preprocessing.compute_pca(images)
    return dataclasses.replace(pre, **changes)


def prepare_inputs(config, run):
    """Reads the training source's description, settles the preprocessing and records both (and
    the config) in the run directory."""
    _, info = data.load_source(config.dataset, "train", config.data_dir,
                               num_classes=config.num_classes,
                               one_based_labels=config.one_based_labels)
    num_classes = config.num_classes or info.num_classes
    pre = _preprocess_config(config, info, run)
    # cifar: two 2x poolings; small: two VALID 5x5 convolutions and poolings need 19; paper:
    # conv1..pool5 need 67; one_weird_trick: Keras' adaptive pooling cannot upsample, so pool5
    # must be at least 6x6 (224 is the design size).
    min_size = {"cifar": 8, "small": 19, "one_weird_trick": 223}.get(config.variant, 67)
    if pre.image_size < min_size:
        raise TrainingError(
            f"image_size {pre.image_size} is too small for variant {config.variant!r} "
            f"(at least {min_size})")
    class_names = info.class_names if len(info.class_names) == num_classes else [
        str(i) for i in range(num_classes)]
    pre.to_json(run.preprocessing)
    config.to_json(run.config)
    with open(run.dataset, "w") as f:
        json.dump({"source": config.dataset, "class_names": class_names}, f, indent=2)
    return Inputs(config, info, num_classes, class_names, pre)


def _steps_per_epoch(config, train_info):
    steps = config.steps_per_epoch
    if steps is None:
        if train_info.num_examples is None:
            raise TrainingError(f"{config.dataset}: size unknown; pass --steps_per_epoch")
        steps = train_info.num_examples // config.batch_size
    if steps < 1:
        raise TrainingError(f"batch_size {config.batch_size} is larger than the training split")
    return steps


def run_input_stage(model, stage):
    """Makes `stage` (a `preprocessing.InputStage`) the first part of the model's train, test and
    predict steps, so that it runs on the model's device on each batch of uint8 crops that
    `make_dataset(..., device_stage=True)` yields: with training=True in training steps only.
    The model itself (its layers, checkpoints and exports) is unchanged."""

    def staged(step, training):
        def step_with_stage(data):
            images, *rest = data if isinstance(data, tuple) else (data,)
            return step((stage(images, training=training), *rest))

        return step_with_stage

    model.train_step = staged(model.train_step, True)
    model.test_step = staged(model.test_step, False)
    model.predict_step = staged(model.predict_step, False)
    return model


def create_model(config, inputs, strategy, steps_per_epoch, resuming):
    """The compiled model: built under the strategy, started from --init_from unless the run
    resumes from its backup, layers frozen as --trainable says, weight decay on the kernels,
    the input stage in its steps."""
    pre = inputs.preprocess
    with strategy.scope():
        model = build_model(config, inputs.num_classes, pre.image_size, pre.channels)
        try:
            if config.init_from and not resuming:
                weights.load_weights(model, config.init_from, trust=config.trust_weights,
                                     new_head=True)
            trainable = weights.set_trainable(model, config.trainable)
        except weights.WeightsError as e:
            raise TrainingError(str(e)) from None
        if config.trainable != "all":
            logging.info("Training %s; the other layers are frozen", ", ".join(trainable))
        _add_weight_decay(model, config.weight_decay)
        model.compile(
            optimizer=_optimizer(config, steps_per_epoch),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[
                keras.metrics.SparseCategoricalAccuracy(name="top1"),
                keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, inputs.num_classes),
                                                            name="top5"),
            ],
            jit_compile=config.jit_compile,
        )
        run_input_stage(model, preprocessing.InputStage(pre, seed=config.seed))
    return model


def create_callbacks(config, run, steps_per_epoch, skipped, chief):
    """(the callbacks in the order Keras calls them at an epoch's end, the Backup among them).
    The backup comes last, so that everything the epoch wrote is in place when the state that
    skips it is committed; it keeps the plateau counters and the best checkpoint's metric."""
    best = backup_lib.AtomicModelCheckpoint(run.checkpoint("best"), monitor="val_top1",
                                            mode="max", save_best_only=True)
    plateau = (DivideOnPlateau(config.lr_decay, config.plateau_patience, config.max_lr_drops)
               if config.schedule == "plateau" else None)
    keep = {"best_checkpoint": (best, ["best"])}
    if plateau is not None:
        keep["plateau"] = (plateau, list(DivideOnPlateau.STATE))
    backup = backup_lib.Backup(run.backup, save_freq=config.checkpoint_every_steps or "epoch",
                               keep=keep, history_csv=run.history)
    stop_on_nan = StopOnNaN(steps_per_epoch)
    callbacks = [
        stop_on_nan,
        *([plateau] if plateau is not None else []),
        EpochReport(config.batch_size, steps_per_epoch, config.epochs, skipped, verbose=chief),
        keras.callbacks.CSVLogger(run.history, append=True),
        backup_lib.AtomicModelCheckpoint(run.checkpoint("last")),
        best,
        keras.callbacks.TensorBoard(run.tensorboard),
        backup,
    ]
    return callbacks, backup


def fit(model, config, strategy, inputs, datasets, steps_per_epoch, callbacks, chief):
    """Resumes from the backup, trains to config.epochs and evaluates; (results, seconds)."""
    train_ds, val_ds = datasets
    backup = next(c for c in callbacks if isinstance(c, backup_lib.Backup))
    stop_on_nan = next(c for c in callbacks if isinstance(c, StopOnNaN))
    start = time.perf_counter()
    work_arounds = keras_compat.fit_work_arounds(
        model, strategy, _dummy_batch(model, strategy, inputs.num_classes))
    with work_arounds, _validation_runs_out_quietly():
        try:
            initial_epoch = backup.restore(model)
        except backup_lib.BackupError as e:
            raise TrainingError(f"{e}; --start_over discards the backup and trains from the "
                                "first epoch") from None
        if initial_epoch and chief:
            logging.info("Resuming from the backup in %s at epoch %d", backup.directory,
                         initial_epoch + 1)
        model.fit(
            train_ds,
            initial_epoch=initial_epoch,
            epochs=config.epochs,
            steps_per_epoch=steps_per_epoch,
            validation_data=val_ds,
            validation_steps=config.eval_steps,
            callbacks=callbacks,
            shuffle=False,  # the tf.data pipeline shuffles
            # A progress bar on a terminal; in logs EpochReport's one line per epoch is enough.
            verbose=1 if os.isatty(1) else 0,
        )
        train_seconds = time.perf_counter() - start
        if stop_on_nan.bad_step is not None:
            epoch, batch, step = stop_on_nan.bad_step
            raise TrainingError(
                f"loss became NaN/inf at step {step} (epoch {epoch + 1}, batch {batch + 1}); "
                "lower --learning_rate or check the data")
        results = model.evaluate(val_ds, steps=config.eval_steps, return_dict=True, verbose=0)
    return {k: float(v) for k, v in results.items()}, train_seconds


def report(results, run):
    """Writes results.json and prints the final line."""
    with open(run.results, "w") as f:
        json.dump(results, f, indent=2)
    summary = (f"final: top-1 accuracy {results['top1']:.4f} (error {results['top1_error']:.4f}), "
               f"top-5 accuracy {results['top5']:.4f} (error {results['top5_error']:.4f})")
    if "ten_crop_top1" in results:
        summary += (f", 10-crop top-1 {results['ten_crop_top1']:.4f} "
                    f"top-5 {results['ten_crop_top5']:.4f}")
    print(f"{summary}; trained {results['train_seconds'] / 60:.1f} min; checkpoints in "
          f"{run.checkpoints}", flush=True)


def train_and_evaluate(config, workdir):
    """Trains `config` in `workdir` (see RunDir for its files), resuming from its backup if one
    is there.

    Returns:
        dict of final metrics (loss, top1, top5, top1_error, top5_error, ten_crop_* if asked,
        train_seconds).
    """
    config.validate()
    check_resumable(config, RunDir(workdir))
    strategy = set_up_process(config)
    chief = _is_chief(strategy)
    run = RunDir(workdir) if chief else RunDir(workdir).worker(strategy.cluster_resolver.task_id)
    run.create(start_over=config.start_over)
    check_splits(config)
    inputs = prepare_inputs(config, run)
    train_ds, train_info = inputs.dataset("train", True)
    val_ds, _ = inputs.dataset("validation", False)
    steps_per_epoch = _steps_per_epoch(config, train_info)
    # Images skipped on tf.data service workers are logged there; their count stays there.
    skipped = None if train_info.skips_on_workers else train_info.skipped
    callbacks, backup = create_callbacks(config, run, steps_per_epoch, skipped, chief)
    model = create_model(config, inputs, strategy, steps_per_epoch, resuming=backup.exists())
    if chief:
        pre = inputs.preprocess
        logging.info("Model %s: %s parameters, %d classes, input %s, %d replica(s), "
                     "oneDNN CPU kernels %s", model.name, f"{model.count_params():,}",
                     inputs.num_classes, (pre.image_size, pre.image_size, pre.channels),
                     strategy.num_replicas_in_sync, "on" if layers.onednn_enabled() else "off")
        if config.data_service:
            logging.info("Training input from the tf.data service at %s; its workers print "
                         "the images they skip", config.data_service)
        # A separate pipeline: a half-read iterator of train_ds would block its cache.
        _write_image_grid(run, inputs.dataset("train", True, service=False)[0], pre)
    results, train_seconds = fit(model, config, strategy, inputs, (train_ds, val_ds),
                                 steps_per_epoch, callbacks, chief)
    results["top1_error"], results["top5_error"] = 1 - results["top1"], 1 - results["top5"]
    if config.ten_crop_eval:
        results.update(evaluate_ten_crop(
            model, inputs.dataset("validation", False, ten_crop=True)[0], config.eval_steps,
            stage=preprocessing.InputStage(inputs.preprocess)))
    results["train_seconds"] = train_seconds
    if chief:
        report(results, RunDir(workdir))
    return results


def evaluate_ten_crop(model, dataset, steps=None, stage=None):
    """Paper §4.1 test-time averaging: mean softmax over the 10 crops of each image. `stage`:
    the InputStage of uint8 crops (make_dataset(..., device_stage=True))."""
    top1 = keras.metrics.SparseCategoricalAccuracy()
    top5 = keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, model.output_shape[-1]))
    for i, (crops, labels) in enumerate(dataset):
        if steps is not None and i >= steps:
            break
        if stage is not None:
            crops = stage(crops, training=False)
        probs = model_lib.crop_averaged_probabilities(model, crops)
        top1.update_state(labels, probs)
        top5.update_state(labels, probs)
    return {"ten_crop_top1": float(top1.result()), "ten_crop_top5": float(top5.result())}
