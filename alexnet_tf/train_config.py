"""Every setting of a training run, with its default and its help: the schema train.py turns
into flags and `training.train_and_evaluate` reads."""

import dataclasses
import json
import os
import re

from alexnet_tf.flag_facts import (DEFAULT_IMAGE_SIZE, INITS, LRN_PRESETS, MAX_PIXELS,
                                   PHOTO_CROP_SCHEMES, SOURCE_KINDS_HELP, VARIANTS)


def _setting(default, help_text, choices=None):
    """A TrainConfig field: its default, its help and its choices (None: any value)."""
    return dataclasses.field(default=default, metadata={"help": help_text, "choices": choices})


class TrainingError(RuntimeError):
    """A training run that cannot go on (bad settings, NaN loss); one-line message."""


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run. Defaults are the paper's ImageNet recipe (§5) where it has one."""

    # Each setting: its default, what it does (train.py's flag help) and, for a choice, the
    # values it takes (train.py's flag refuses others, validate() too).
    dataset: str = _setting(
        "fashion_mnist", f"{SOURCE_KINDS_HELP} (see alexnet_tf.sources).")
    data_dir: str | None = _setting(None, "TFDS data directory.")
    variant: str = _setting("paper", "AlexNet variant (see alexnet_tf.AlexNet).",
                            VARIANTS)
    num_classes: int | None = _setting(None, "Classes of fc8; default: the dataset's.")
    image_size: int | None = _setting(
        None, "Crop size fed to the model; default: the variant's ("
        + ", ".join(f"{v} {size}" for v, size in DEFAULT_IMAGE_SIZE.items())
        + "), or the images' own for small images such as MNIST's 28.")
    lrn: str = _setting("paper", "LRN preset, or none.", (*LRN_PRESETS, "none"))
    init: str = _setting("paper", "Weight initialisation (paper §5, BVLC Caffe, Keras defaults).",
                         INITS)
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
                         "cropped.", PHOTO_CROP_SCHEMES)
    pad: int | None = _setting(
        None, "Small images: zero padding of the random crop (default image_size // 8; 0: no "
        "crop).")
    pca: str = _setting("imagenet", "PCA lighting eigen-pairs: ImageNet's, your training set's "
                        "(prepared: sources: all of its pixels, from prepare.py; others: 1,000 "
                        "images), or no lighting.", ("imagenet", "dataset", "none"))
    max_pixels: int = _setting(
        MAX_PIXELS, "Encoded images whose header declares more pixels are skipped "
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
    jit_compile: str = _setting(
        "auto", "Compile the training step with XLA; auto: on GPUs (2.5x on an H200), off on "
        "CPUs, where it is slower (BENCHMARKS.md).", ("auto", "true", "false"))
    steps_per_execution: int = _setting(
        0, "Training steps per call from Python (Keras steps_per_execution): Keras waits for "
        "the device after each call, so several steps per call keep a GPU busy; callbacks see "
        "every Nth step. 0: auto (GPUs: up to 20, CPUs: up to 10, a divisor of "
        "--steps_per_epoch; 1 with several replicas).")
    seed: int | None = _setting(
        None, "Seed for initialisation, shuffling and augmentation (deterministic pipeline).")
    ten_crop_eval: bool = _setting(
        False, "Final evaluation with 10-crop averaging (paper §4.1).")
    backup_every_minutes: float = _setting(
        5.0, "Back up the training state (and write the last checkpoint) at the first epoch end "
        "this many minutes after the previous backup (sooner for a model that saves in under "
        "1% of the time since), at the last epoch's end, and mid-epoch when an epoch runs "
        "longer; 0: at every epoch end.")
    checkpoint_every_steps: int | None = _setting(
        None, "Also back up every N steps.")
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
        """TrainingError (one line) for a setting out of its range or choices: the checks that
        read the settings alone. `training.check_weights_and_source` makes the two that need
        TensorFlow (the weights of --init_from, the kind of --dataset) at the start of a run."""
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
            (self.steps_per_execution >= 0,
             f"steps_per_execution must be >= 0 (0: auto), got {self.steps_per_execution}"),
            (self.backup_every_minutes >= 0,
             f"backup_every_minutes must be >= 0, got {self.backup_every_minutes}"),
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

    def to_json(self, path):
        with open(path, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2)

    @classmethod
    def from_json(cls, path):
        """The TrainConfig `to_json` wrote: settings the file lacks take their defaults, and
        settings it has that this version does not know are left out. OSError or ValueError
        when it cannot be read."""
        with open(path) as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object of settings")
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in saved.items() if name in names})


# What a resumed run must share with the run it resumes: these settings shape the model, its
# optimizer's state (saved with the weights) or the data, whose preprocessing the run keeps.
RESUME_SETTINGS = ("dataset", "variant", "num_classes", "image_size", "lrn", "crop", "pad", "pca",
                   "max_pixels", "one_based_labels", "optimizer", "trainable", "mixed_precision")
