"""The README's main command with several seeds: each trains configs/fashion_mnist.cfg, exports
it, and has the export classify the 10,000 Fashion-MNIST test images.

    python benchmarks/main_job.py --out=/tmp/main_job --seeds=1,2,3
    ONEDNN_MAX_CPU_ISA=AVX2 TF_ENABLE_ONEDNN_OPTS=0 python benchmarks/main_job.py \
        --out=/tmp/main_job_avx2 --seeds=1,2,3       # as a CPU with AVX2 and no bf16 computes
    python benchmarks/main_job.py --out=/tmp/ls0 --seeds=1 --train_flags=--label_smoothing=0

Each seed, as a user runs the command: `train.py --flagfile=configs/fashion_mnist.cfg
--seed=S --workdir=OUT/seed_S` (plus --train_flags) and `export.py`, each in a process of its
own, in the environment this script was started in. Then the export's `predict_images`, loaded
as TF Serving loads a SavedModel, classifies the test images (Debian's dataset-fashion-mnist).
One row per seed: the precision train.py chose, its training minutes (its own summary line),
the seconds of train + export, the export's top-1; then the median top-1.
"""

import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("out", None, "Where each seed's run and export go.", required=True)
flags.DEFINE_list("seeds", ["1", "2", "3"], "One run per seed.")
flags.DEFINE_list("train_flags", [], "More train.py flags (a recipe change to measure).")
FLAGS = flags.FLAGS


def train_and_export(seed):
    """(precision, training minutes, seconds of both commands, export path) of one seed."""
    workdir = os.path.join(FLAGS.out, f"seed_{seed}")
    start = time.perf_counter()
    train = subprocess.run(
        [sys.executable, "train.py", "--flagfile=configs/fashion_mnist.cfg", f"--seed={seed}",
         f"--workdir={workdir}", *FLAGS.train_flags],
        cwd=ROOT, capture_output=True, text=True)
    if train.returncode:
        sys.exit(f"train.py failed (seed {seed}):\n{train.stderr[-3000:]}")
    export_dir = os.path.join(FLAGS.out, f"export_{seed}")
    export = subprocess.run(
        [sys.executable, "export.py", f"--workdir={workdir}", f"--export_dir={export_dir}",
         "--overwrite", "--version=1"], cwd=ROOT, capture_output=True, text=True)
    if export.returncode:
        sys.exit(f"export.py failed (seed {seed}):\n{export.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    log = train.stdout + train.stderr
    precision = re.search(r"--mixed_precision=\w+: (\w+)", log)
    minutes = re.search(r"trained ([\d.]+) min", log)
    precision = precision.group(1) if precision else "none"
    return ("float32" if precision == "none" else precision, float(minutes.group(1)), seconds,
            os.path.join(export_dir, "1"))


def export_top1(path):
    """Top-1 of the export's predict_images on the 10,000 Fashion-MNIST test images."""
    import numpy as np
    import tensorflow as tf

    from alexnet_tf import sources

    images, labels = (sources.read_idx(os.path.join(sources.IDX_DIRS["fashion_mnist"], name))
                      for name in sources.IDX_FILES["test"])
    predict = tf.saved_model.load(path).signatures["predict_images"]
    pixels = images[..., None].astype(np.float32)
    predicted = np.concatenate([predict(images=tf.constant(pixels[i:i + 1000]))["class_ids"]
                                .numpy()[:, 0] for i in range(0, len(pixels), 1000)])
    return float((predicted == labels).mean())


def main(argv):
    del argv
    print(f"{common.cpu_model()}; {common.versions()}; TF_ENABLE_ONEDNN_OPTS="
          f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset (train.py: 1)')}, ONEDNN_MAX_CPU_ISA="
          f"{os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}; train.py flags added: "
          f"{' '.join(FLAGS.train_flags) or 'none'}", flush=True)
    runs = []
    for seed in FLAGS.seeds:
        runs.append((seed, *train_and_export(seed)))
        print(f"seed {seed}: trained and exported", flush=True)
    print(f"{'seed':>6}{'precision':>11}{'training min':>14}{'train+export s':>16}"
          f"{'export top-1':>14}")
    top1s = []
    for seed, precision, minutes, seconds, path in runs:
        top1s.append(export_top1(path))
        print(f"{seed:>6}{precision:>11}{minutes:>14.1f}{seconds:>16.0f}{top1s[-1]:>14.4f}",
              flush=True)
    print(f"median export top-1 of {len(top1s)} seeds: {statistics.median(top1s):.4f}")


if __name__ == "__main__":
    app.run(main)
