"""Train AlexNet from the command line: python train.py --flagfile=configs/<recipe>.cfg

This file holds the flags and main() only; the work is in alexnet_tf.training.
"""

import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up noise out
# oneDNN's CPU kernels train these models faster on AVX2 CPUs too, where TensorFlow leaves them
# off by default (BENCHMARKS.md). Read once, when TensorFlow starts; a user's own setting wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from absl import app, flags, logging  # noqa: E402

from alexnet_tf import cli, data, keras_compat, training  # noqa: E402

_DEFAULTS = training.TrainConfig()
_HELP = {
    "dataset": "tfds:<name> | tfrecord:<glob> | folder:<path> | fashion_mnist[:<dir>] | mnist[:<dir>]",
    "data_dir": "TFDS data directory.",
    "variant": "AlexNet variant: paper | single_tower | one_weird_trick | cifar.",
    "num_classes": "Classes of fc8; inferred from the dataset when omitted.",
    "image_size": "Crop size fed to the model; default: the variant's (227) or the images' own.",
    "lrn": "LRN preset: paper | caffe | tf_cifar10 | none.",
    "init": "Weight initialisation: paper | caffe | keras.",
    "dropout": "Dropout rate of fc6/fc7.",
    "batch_size": "Global batch size, split across replicas.",
    "epochs": "Training epochs.",
    "steps_per_epoch": "Steps per epoch (default: one pass over the training split).",
    "eval_steps": "Validation batches per evaluation (default: the whole split).",
    "optimizer": "sgd | adam.",
    "learning_rate": "Base learning rate.",
    "momentum": "SGD momentum.",
    "weight_decay": "L2 weight decay on kernels (paper's coupled form).",
    "schedule": "plateau | step | cosine | constant.",
    "lr_decay": "Factor of each learning-rate drop (plateau and step).",
    "plateau_patience": "Epochs without a better validation top-1 before a drop.",
    "max_lr_drops": "At most this many plateau drops.",
    "step_size": "Iterations between drops for schedule=step.",
    "warmup_epochs": "Linear warm-up epochs (cosine).",
    "scale_lr_batch": "Scale the learning rate by batch_size / this (linear scaling rule).",
    "crop": "Training crop for photos: paper | inception.",
    "pad": "Small images: zero padding of the random crop (default image_size // 8; 0: no crop).",
    "pca": "PCA lighting eigen-pairs: imagenet | dataset | none.",
    "max_pixels": "Encoded images whose header declares more pixels are skipped and counted, "
                  "not decoded (decompression bombs); export.py's default budget.",
    "cache": "Cache decoded records in memory (small datasets).",
    "shuffle_buffer": "Shuffle buffer size in records.",
    "one_based_labels": "TFRecord labels start at 1.",
    "strategy": "auto | mirrored | multi_worker | one_device | tpu.",
    "cpu_replicas": "Split the CPU into this many logical devices (exercises mirrored on CPU).",
    "mixed_precision": "none | float16 | bfloat16 | auto (bfloat16 or float16 where the GPU or "
                       "CPU computes it natively, else none).",
    "jit_compile": "Compile the train step with XLA.",
    "seed": "Seed for initialisation, shuffling and augmentation (deterministic pipeline).",
    "ten_crop_eval": "Final evaluation with 10-crop averaging (paper §4.1).",
    "checkpoint_every_steps": "Also back up every N steps (default: every epoch).",
    "start_over": "Discard the workdir's backup and history and train from the first epoch "
                  "(default: resume from them).",
    "init_from": "Start from these weights: bvlc_alexnet.npy (Caffe), a torchvision .pth, or a "
                 ".keras checkpoint; fc8 is new when the class count differs.",
    "trainable": "all, or the comma-separated layers to train (e.g. fc6,fc7,fc8); others frozen.",
    "trust_weights": "Allow unpickling a Caffe .npy file (a pickle can run code; only for files "
                     "you trust).",
}


def _define_flags():
    for field in dataclasses.fields(training.TrainConfig):
        default = getattr(_DEFAULTS, field.name)
        kind = str(field.type)
        help_text = _HELP[field.name]
        if "bool" in kind:
            flags.DEFINE_bool(field.name, default, help_text)
        elif "int" in kind:
            flags.DEFINE_integer(field.name, default, help_text)
        elif "float" in kind:
            flags.DEFINE_float(field.name, default, help_text)
        else:
            flags.DEFINE_string(field.name, default, help_text)
    flags.DEFINE_string("workdir", "runs/default", "Where checkpoints, logs and results go; "
                        "running the same command again resumes from it.")


_define_flags()
FLAGS = flags.FLAGS


def config_from_flags():
    return training.TrainConfig(
        **{f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(training.TrainConfig)})


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    try:
        training.train_and_evaluate(config_from_flags(), FLAGS.workdir)
    except (training.TrainingError, data.DataError, keras_compat.KerasCompatibilityError,
            OSError, *cli.TF_FILE_ERRORS) as e:
        cli.exit_with_error("train.py", e)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("train.py"))
