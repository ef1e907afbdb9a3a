"""How long train.py takes to stop at a termination signal (a preemptible machine's notice gives
about 30 s): the backup it writes, for the README recipe and the paper model, and the README
recipe's whole way from SIGTERM to the end of the process.

    python benchmarks/stop_on_signal.py
    python benchmarks/stop_on_signal.py --recipes=configs/imagenet_paper.cfg --repeats=5

save      Backup.save of the recipe's model with its optimizer's state (what a signal writes:
          the weights file, fsynced state.json), median of --repeats, in a fresh directory each
stop      the README recipe (configs/fashion_mnist.cfg) run by train.py: SIGTERM in its second
          epoch, to the process's exit (the rest of the running call of steps, the backup, the
          exit), median of --repeats runs

iterator  what train.py does not save: a checkpoint of the README recipe's training iterator
          (tf.train.Checkpoint), which would let a rerun continue the data order; taken after
          --iterator_batches batches (past the first epoch, the cache is complete)

A signal is acted on between Keras' calls of steps (devices.steps_per_execution: up to 10 on a
CPU, 20 on a GPU), so the longest wait before the save is one call: multiply the step time of
BENCHMARKS.md's training tables by the steps per call.
"""

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_list("recipes", ["configs/fashion_mnist.cfg", "configs/imagenet_paper.cfg"],
                      "Recipes whose model's backup is timed.")
    flags.DEFINE_integer("repeats", 3, "Saves (and README-recipe stops) timed.")
    flags.DEFINE_integer("iterator_batches", 500, "Batches read before the iterator is saved.")


def save_seconds(recipe, repeats):
    """(state size in MB, median seconds of Backup.save) of the model of `recipe`."""

    sys.path.insert(0, ROOT)
    import train
    from alexnet_tf import backup, flag_facts, recipe as recipe_lib, strategy

    flags.FLAGS.unparse_flags()
    flags.FLAGS(["train.py", f"--flagfile={os.path.join(ROOT, recipe)}"])
    config = train.config_from_flags()
    strategy.set_up_process(config)
    classes = 10 if "fashion" in recipe else 1000
    size = 28 if "fashion" in recipe else flag_facts.DEFAULT_IMAGE_SIZE[config.variant]
    model = recipe_lib.build_model(config, classes, size, 1 if "fashion" in recipe else 3)
    model.compile(optimizer=recipe_lib.optimizer(config, 1000), loss=recipe_lib.loss(config))
    model.optimizer.build(model.trainable_variables)
    seconds, megabytes = [], 0.0
    for _ in range(repeats):
        directory = tempfile.mkdtemp(prefix="alexnet_tf_stop_")
        saver = backup.Backup(directory)
        saver.set_model(model)
        started = time.perf_counter()
        saver.save(1, step=5)
        seconds.append(time.perf_counter() - started)
        megabytes = sum(os.path.getsize(os.path.join(directory, n))
                        for n in os.listdir(directory)) / 1e6
    return megabytes, statistics.median(seconds)


def iterator_checkpoint(batches):
    """(MB, seconds) of a tf.train.Checkpoint of the README recipe's training iterator after
    `batches` batches, in a process of its own (the recipe's flags)."""
    code = f"""
import os, sys, tempfile, time
sys.path.insert(0, {ROOT!r})
import train
from absl import flags
flags.FLAGS(["train.py", "--flagfile={os.path.join(ROOT, 'configs', 'fashion_mnist.cfg')}"])
import tensorflow as tf
from alexnet_tf import inputs
from alexnet_tf.rundir import RunDir
config = train.config_from_flags()
run = RunDir(tempfile.mkdtemp()); run.create()
iterator = iter(inputs.prepare_inputs(config, run).dataset("train", True)[0])
for _ in range({batches}):
    next(iterator)
directory = tempfile.mkdtemp()
started = time.perf_counter()
tf.train.Checkpoint(iterator=iterator).write(os.path.join(directory, "it"))
seconds = time.perf_counter() - started
size = sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory))
print("ITERATOR", size / 1e6, seconds)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    line = [x for x in result.stdout.splitlines() if x.startswith("ITERATOR ")]
    if not line:
        raise SystemExit(f"iterator checkpoint failed: {result.stderr[-2000:]}")
    return tuple(float(x) for x in line[0].split()[1:])


def readme_stop_seconds():
    """Seconds from SIGTERM, sent once train.py's first epoch line is out, to its exit."""
    workdir = tempfile.mkdtemp(prefix="alexnet_tf_stop_run_")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"),
         f"--flagfile={os.path.join(ROOT, 'configs', 'fashion_mnist.cfg')}",
         "--steps_per_epoch=100", "--eval_steps=1", f"--workdir={workdir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONPATH=ROOT))
    for line in proc.stdout:
        if line.startswith("epoch 1/"):
            break
    time.sleep(1.0)  # into the second epoch
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    proc.wait()
    seconds = time.perf_counter() - sent
    if proc.returncode != 143:
        raise SystemExit(f"train.py ended with {proc.returncode}, not 143: {out[-2000:]}")
    return seconds, out.strip().splitlines()[-1]


def main(argv):
    del argv
    # Parsing a recipe's flags resets these.
    recipes, repeats, batches = FLAGS.recipes, FLAGS.repeats, FLAGS.iterator_batches
    for recipe in recipes:
        megabytes, seconds = save_seconds(recipe, repeats)
        print(f"{recipe}: backup of {megabytes:,.0f} MB saved in {seconds:.2f} s "
              f"(median of {repeats})", flush=True)
    stops = []
    for _ in range(repeats):
        seconds, last = readme_stop_seconds()
        stops.append(seconds)
        print(f"  SIGTERM to exit {seconds:.2f} s: {last}", flush=True)
    print("configs/fashion_mnist.cfg through train.py: SIGTERM to exit "
          f"{statistics.median(stops):.2f} s (median of {repeats})", flush=True)
    megabytes, seconds = iterator_checkpoint(batches)
    print(f"configs/fashion_mnist.cfg's training iterator after {batches} "
          f"batches (not saved by train.py): {megabytes:,.0f} MB in {seconds:.2f} s")


if __name__ == "__main__":
    define_flags()
    app.run(main)
