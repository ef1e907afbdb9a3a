"""What train.py costs beside the bare training step: its steady-state rate over the rate of the
same model's steps alone, on the same batch size and data, on this machine.

    python benchmarks/train_overhead.py                      # Fashion-MNIST, the README recipe
    python benchmarks/train_overhead.py --rounds=3 --steps=100

bare      the run's model (training.create_model: its optimizer, weight decay, input stage, XLA
          and steps per call as train.py decides them) trained by fit() on one batch of the
          training split's uint8 crops, repeated from memory: no input pipeline, no validation,
          no callbacks but the clock
train.py  the README recipe (configs/fashion_mnist.cfg) in a process of its own: its input
          pipeline, callbacks, backups and validation

Both run --epochs epochs of --steps steps, and both are timed alike, at the same point of their
run: the last epoch's steps after its first call, by train.py's own epoch clock (EpochReport,
which history.csv records). A rate taken in a process's first seconds reads several percent
above the same steps later on this kind of machine, so a bare rate from a shorter run would
not be the same measurement.

Rounds alternate the two (the machine's speed drifts); the medians and their ratio are printed.
"""

import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "fashion_mnist.cfg")
FLAGS = flags.FLAGS

# The bare measurement, in a process of its own: train.py's flags parse the recipe.
BARE = f"""
import sys
sys.path[:0] = [{ROOT!r}, {os.path.dirname(os.path.abspath(__file__))!r}]
import train
from absl import flags
flags.FLAGS(["train.py", "--flagfile={RECIPE}", "--steps_per_epoch=" + sys.argv[1],
             "--epochs=" + sys.argv[2]])
import train_overhead
print("BARE", train_overhead.bare_rate(train.config_from_flags()), flush=True)
"""


def define_flags():
    flags.DEFINE_integer("steps", 60, "Steps per epoch, of both.")
    flags.DEFINE_integer("epochs", 3, "Epochs of both (the last is timed).")
    flags.DEFINE_integer("rounds", 2, "Rounds of (bare, train.py).")


def bare_rate(config):
    """img/s of the run's model on one repeated batch of its training crops: the last of
    config.epochs epochs of config.steps_per_epoch steps, timed as train.py times its epochs."""
    import tensorflow as tf

    from alexnet_tf import inputs as inputs_lib, strategy as strategy_lib, training
    from alexnet_tf.callbacks import EpochReport
    from alexnet_tf.rundir import RunDir

    steps = config.steps_per_epoch
    strategy = strategy_lib.set_up_process(config)
    run = RunDir(tempfile.mkdtemp(prefix="alexnet_tf_overhead_"))
    run.create(start_over=True)
    inputs = inputs_lib.prepare_inputs(config, run, inputs_lib.source_of(config))
    train_ds, _ = inputs.dataset("train", True)
    batch = next(iter(train_ds))
    model = training.create_model(config, inputs, strategy, steps, resuming=False)
    options = tf.data.Options()
    options.autotune.enabled = False
    data = tf.data.Dataset.from_tensors(batch).repeat().with_options(options)
    clock = EpochReport(config.batch_size, steps, config.epochs, verbose=False)
    history = model.fit(data, steps_per_epoch=steps, epochs=config.epochs, verbose=0,
                        callbacks=[clock])
    return history.history["images_per_sec"][-1]


def train_py_rate():
    workdir = tempfile.mkdtemp(prefix="alexnet_tf_overhead_run_")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), f"--flagfile={RECIPE}",
         f"--epochs={FLAGS.epochs}", f"--steps_per_epoch={FLAGS.steps}", "--eval_steps=1",
         f"--workdir={workdir}"], capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=ROOT))
    if result.returncode:
        raise SystemExit(f"train.py failed: {result.stderr[-2000:]}")
    return common.last_epoch_rate(workdir)


def main(argv):
    del argv
    bare, full = [], []
    for _ in range(FLAGS.rounds):
        result = subprocess.run([sys.executable, "-c", BARE, str(FLAGS.steps), str(FLAGS.epochs)],
                                capture_output=True, text=True,
                                env=dict(os.environ, PYTHONPATH=ROOT))
        line = [x for x in result.stdout.splitlines() if x.startswith("BARE ")]
        if not line:
            raise SystemExit(f"bare measurement failed: {result.stderr[-2000:]}")
        bare.append(float(line[0].split()[1]))
        full.append(train_py_rate())
        print(f"round: bare {bare[-1]:,.0f} img/s, train.py {full[-1]:,.0f} img/s, "
              f"ratio {full[-1] / bare[-1]:.3f}", flush=True)
    b, t = statistics.median(bare), statistics.median(full)
    ratio = statistics.median(f / b for f, b in zip(full, bare))
    print(f"{os.path.relpath(RECIPE, ROOT)}, {FLAGS.epochs} epochs of {FLAGS.steps} steps, "
          f"medians of {FLAGS.rounds} rounds: bare {b:,.0f} img/s, train.py {t:,.0f} img/s, "
          f"train.py / bare = {ratio:.2f} (median of the rounds' ratios)")


if __name__ == "__main__":
    define_flags()
    app.run(main)
