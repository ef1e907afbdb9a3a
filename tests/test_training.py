"""train.py / training.train_and_evaluate: end-to-end runs per strategy, flags, resume, schedule."""

import dataclasses
import gzip
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import tensorflow as tf
import pytest

from alexnet_tf import backup as backup_lib, callbacks, preprocessing, preprocessing_layers
from alexnet_tf import recipe, train_config, training
from alexnet_tf import strategy as strategy_lib
from tests.helpers import (ROOT, assert_one_line_error, history, pixel_eigenvalues, run_train,
                           settled_inputs, tiny_config, tiny_idx, write_folder_tree)


@pytest.mark.onednn
def test_one_device_end_to_end(tmp_path):
    workdir = str(tmp_path / "run")
    results = training.train_and_evaluate(tiny_config(tmp_path, epochs=2), workdir)
    for key in ("loss", "top1", "top5", "top1_error", "top5_error"):
        assert key in results
    assert results["top1_error"] == pytest.approx(1 - results["top1"])
    rows = history(workdir)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert {"val_top1", "val_top5", "learning_rate", "images_per_sec"} <= set(rows[0])
    for name in ("config.json", "dataset.json", "preprocessing.json", "results.json",
                 "checkpoints/best.keras", "checkpoints/last.keras"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert os.listdir(os.path.join(workdir, "tensorboard", "train"))
    model = keras.models.load_model(os.path.join(workdir, "checkpoints", "last.keras"))
    assert int(model.optimizer.iterations) == 4


@pytest.mark.onednn
def test_ten_crop_metrics_are_the_average_over_the_ten_views(tmp_path):
    config = tiny_config(tmp_path, ten_crop_eval=True)
    results = training.train_and_evaluate(config, str(tmp_path / "run"))
    # The same metrics by hand on the first validation batch (eval_steps=1): the 28x28 images
    # are their own four corners and centre, so the ten views are five copies of the normalised
    # image and five of its mirror (Fashion-MNIST's published mean and std).
    with gzip.open(tmp_path / "idx" / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read()[16:], np.uint8).reshape(-1, 28, 28, 1)[:32]
    with gzip.open(tmp_path / "idx" / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read()[8:], np.uint8)[:32]
    x = (images.astype(np.float32) - 72.94) / 90.02
    model = keras.models.load_model(tmp_path / "run" / "checkpoints" / "last.keras")

    def softmax(v):
        e = np.exp(v - v.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    views = [x] * 5 + [x[:, :, ::-1]] * 5
    probabilities = np.mean([softmax(model.predict(v, verbose=0)) for v in views], axis=0)
    top5 = np.argsort(-probabilities, axis=1)[:, :5]
    assert results["ten_crop_top1"] == pytest.approx(np.mean(top5[:, 0] == labels))
    assert results["ten_crop_top5"] == pytest.approx(np.mean((top5 == labels[:, None]).any(1)))


def test_nan_loss_stops_with_the_step(tmp_path):
    config = tiny_config(tmp_path, learning_rate=1e12, epochs=3, steps_per_epoch=5, init="keras")
    with pytest.raises(train_config.TrainingError, match=r"loss became NaN/inf at step \d+ \(epoch"):
        training.train_and_evaluate(config, str(tmp_path / "run"))


def test_auto_strategy_on_one_device_is_the_default_strategy(tmp_path):
    # Not OneDeviceStrategy: its per-device iterators keep tf.data autotuning on (see
    # make_strategy); the explicit choice stays available.
    assert strategy_lib.make_strategy(tiny_config(tmp_path)) is tf.distribute.get_strategy()
    one_device = strategy_lib.make_strategy(tiny_config(tmp_path, strategy="one_device"))
    assert isinstance(one_device, tf.distribute.OneDeviceStrategy)


@pytest.mark.slow
def test_mirrored_over_two_logical_cpus(tmp_path):
    result = run_train([f"--dataset={tiny_idx(tmp_path)}", "--variant=cifar", "--init=keras",
                        "--strategy=mirrored", "--cpu_replicas=2", "--batch_size=32",
                        "--epochs=1", "--steps_per_epoch=2", "--eval_steps=1",
                        f"--workdir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 replica(s)" in result.stderr
    assert os.path.exists(tmp_path / "run" / "results.json")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["none", "bfloat16", "float16"])
def test_xla_trains_under_mirrored_over_two_logical_cpus(tmp_path, precision):
    # Keras compiles strategy.run whole and fails with several replicas ("Trying to access
    # resource .../replica_1"); each replica's step compiles itself instead. Without dropout,
    # and with the input stage seeded by (seed, step, replica), XLA and plain TensorFlow train
    # the same weights.
    weights = {}
    for jit in ("true", "false"):
        workdir = tmp_path / f"run_{jit}"
        result = run_train([f"--dataset={tiny_idx(tmp_path)}", "--variant=cifar", "--init=keras",
                            "--lrn=tf_cifar10", "--dropout=0", "--seed=3",
                            "--strategy=mirrored", "--cpu_replicas=2", "--batch_size=32",
                            "--epochs=1", "--steps_per_epoch=3", "--eval_steps=1",
                            f"--mixed_precision={precision}", f"--jit_compile={jit}",
                            f"--workdir={workdir}"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "2 replica(s)" in result.stderr
        assert f"XLA {'on' if jit == 'true' else 'off'}, 1 step(s) per call" in result.stderr
        model = keras.models.load_model(workdir / "checkpoints" / "last.keras")
        if precision != "float16":  # a loss-scale optimizer's state does not load in float32
            assert int(model.optimizer.iterations) == 3
        weights[jit] = model.get_weights()
    tolerance = 1e-4 if precision == "none" else 5e-2
    for xla, plain in zip(weights["true"], weights["false"]):
        np.testing.assert_allclose(xla, plain, atol=tolerance, rtol=tolerance)


def test_steps_per_call_are_checked_against_the_epoch_and_the_replicas(tmp_path):
    config = tiny_config(tmp_path, steps_per_execution=3, steps_per_epoch=10)
    with pytest.raises(train_config.TrainingError, match="does not divide the 10 steps"):
        training.step_settings(config, tf.distribute.get_strategy(), 10)
    config = tiny_config(tmp_path, steps_per_execution=2, steps_per_epoch=10)
    two = type("TwoReplicas", (), {"num_replicas_in_sync": 2})()
    with pytest.raises(train_config.TrainingError, match="fails with 2 replicas"):
        training.step_settings(config, two, 10)
    assert training.step_settings(config, tf.distribute.get_strategy(), 10)[1] == 2


@pytest.mark.onednn
def test_several_steps_per_call_train_every_step_and_keep_the_schedule(tmp_path):
    # 4 epochs of 6 steps in calls of 3: the step count and the cosine schedule's learning
    # rate are those of 24 steps, whatever the call size.
    config = tiny_config(tmp_path, epochs=4, steps_per_epoch=6, steps_per_execution=3,
                         schedule="cosine", learning_rate=0.1)
    workdir = tmp_path / "run"
    training.train_and_evaluate(config, str(workdir))
    model = keras.models.load_model(workdir / "checkpoints" / "last.keras")
    assert int(model.optimizer.iterations) == 24
    rates = [float(r["learning_rate"]) for r in history(workdir)]
    expected = [0.1 * 0.5 * (1 + np.cos(np.pi * 6 * (e + 1) / 24)) for e in range(4)]
    np.testing.assert_allclose(rates, expected, atol=1e-6)


def test_the_epoch_rate_leaves_out_the_first_call_and_validation():
    now = [0.0]
    report = callbacks.EpochReport(global_batch=10, steps_per_epoch=4, epochs=1, verbose=False,
                                   clock=lambda: now[0])
    report.set_model(type("M", (), {"optimizer": keras.optimizers.SGD(0.1)})())
    report.on_epoch_begin(0)
    for batch, seconds in enumerate([30.0, 1.0, 1.0, 1.0]):  # the first call compiles
        report.on_train_batch_begin(batch)
        now[0] += seconds
        report.on_train_batch_end(batch)
    now[0] += 20.0  # validation
    logs = {}
    report.on_epoch_end(0, logs)
    assert logs["images_per_sec"] == pytest.approx(3 * 10 / 3.0)


def test_the_input_stage_draws_from_the_seed_and_the_step():
    pre = preprocessing.PreprocessConfig(image_size=8, resize_size=8)
    images = tf.cast(tf.random.stateless_uniform([4, 8, 8, 3], [1, 2], 0, 255), tf.uint8)

    def draw(seed, step):
        stage = preprocessing_layers.InputStage(pre, seed=seed)
        return stage(images, training=True, step=tf.constant(step, tf.int64)).numpy()

    np.testing.assert_array_equal(draw(5, 7), draw(5, 7))  # a resumed step draws the same
    assert not np.array_equal(draw(5, 7), draw(5, 8))
    assert not np.array_equal(draw(5, 7), draw(6, 7))


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
@pytest.mark.parametrize("setting, expected", [(None, "on"), ("0", "off"), ("1", "on")])
def test_train_py_turns_onednn_on_unless_the_user_set_it(tmp_path, setting, expected):
    env = dict(os.environ)
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), f"--dataset={tiny_idx(tmp_path)}",
         "--variant=cifar", "--init=keras", "--batch_size=32", "--epochs=1",
         "--steps_per_epoch=1", "--eval_steps=1", f"--workdir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=tmp_path, env=dict(env, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"oneDNN CPU kernels {expected}" in result.stderr


@pytest.mark.slow
def test_multi_worker_two_local_processes(tmp_path):
    dataset = tiny_idx(tmp_path)
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        env = dict(os.environ, PYTHONPATH=ROOT, TF_CONFIG=tf_config)
        args = [sys.executable, os.path.join(ROOT, "train.py"), f"--dataset={dataset}",
                "--variant=cifar", "--init=keras", "--strategy=multi_worker", "--batch_size=32",
                "--epochs=1", "--steps_per_epoch=2", "--eval_steps=1",
                f"--workdir={tmp_path / 'run'}"]
        procs.append(subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    assert "2 replica(s)" in outputs[0]
    assert os.path.exists(tmp_path / "run" / "results.json")
    assert os.path.exists(tmp_path / "run" / "checkpoints" / "last.keras")


@pytest.mark.slow
def test_resume_after_sigkill_continues_at_the_next_epoch(tmp_path):
    workdir = tmp_path / "run"
    args = [f"--dataset={tiny_idx(tmp_path, n=1024)}", "--variant=cifar", "--init=keras",
            "--batch_size=32", "--epochs=3", "--steps_per_epoch=30", "--eval_steps=1",
            "--schedule=constant", f"--workdir={workdir}"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(workdir / "history.csv") and len(history(workdir)) >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    completed = len(history(workdir))
    assert 1 <= completed < 3, "the run should be killed after its first epoch and before the end"

    result = run_train(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    epochs = [int(r["epoch"]) for r in history(workdir)]
    assert epochs == [0, 1, 2]  # nothing repeated, nothing lost
    model = keras.models.load_model(workdir / "checkpoints" / "last.keras")
    assert int(model.optimizer.iterations) == 3 * 30  # optimizer state came back too


def _backup_serial(workdir):
    path = workdir / "backup" / "state.json"
    return json.loads(path.read_text())["serial"] if path.exists() else 0


@pytest.mark.slow
def test_sigterm_and_sigkill_at_ten_random_moments_lose_nothing(tmp_path):
    """Stops training 10 times, by SIGTERM and by SIGKILL (5 each, in a seeded random order),
    each at a random moment after a random number (0-6) of its backups: a backup every 2 steps
    puts many of the kills in the middle of a write. A SIGTERM ends the run with exit status 143
    and one line saying where it stopped; every rerun resumes, never earlier than the one
    before, and the last one finishes with each epoch once in history.csv and the step count
    of an uninterrupted run."""
    workdir = tmp_path / "run"
    args = [f"--dataset={tiny_idx(tmp_path, n=1024)}", "--variant=cifar", "--init=keras",
            "--batch_size=32", "--epochs=8", "--steps_per_epoch=10", "--eval_steps=1",
            "--checkpoint_every_steps=2", "--steps_per_execution=1", "--schedule=plateau",
            "--plateau_patience=1", f"--workdir={workdir}"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    rng = random.Random(0)
    signals = [signal.SIGTERM] * 5 + [signal.SIGKILL] * 5
    rng.shuffle(signals)
    resumed_at, during_a_write, stopped = [], 0, 0
    for kill, signum in enumerate(signals):
        had_backup = (workdir / "backup" / "state.json").exists()
        ready = "Resuming from the backup" if had_backup else "parameters"
        log = tmp_path / f"log{kill}.txt"
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args],
                                    cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and ready not in log.read_text():
            time.sleep(0.02)
        target = _backup_serial(workdir) + rng.randint(0, 6)
        while time.time() < deadline and proc.poll() is None and _backup_serial(workdir) < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.15))
        running = proc.poll() is None
        proc.send_signal(signum)
        proc.wait(timeout=60)
        text = log.read_text()
        assert ready in text and "Traceback" not in text, text[-3000:]
        if signum == signal.SIGTERM and running and "final: top-1" not in text:
            stopped += 1
            assert proc.returncode == 143, text[-3000:]
            assert re.search(r"train.py: stopped at epoch \d+ step \d+ by SIGTERM; rerun the "
                             r"same command to continue\n$", text), text[-3000:]
        if had_backup:
            resumed_at.append(tuple(int(n) for n in re.search(
                r"Resuming from the backup in \S+ at epoch (\d+), step (\d+)", text).groups()))
        if (workdir / "backup" / "state.json").exists():
            state = json.loads((workdir / "backup" / "state.json").read_text())
            committed = {state["weights"], (state["previous"] or {}).get("weights"), "state.json"}
            during_a_write += bool(set(os.listdir(workdir / "backup")) - committed or [
                name for name in os.listdir(workdir / "checkpoints") if name.startswith(".tmp-")])
    assert len(resumed_at) >= 8 and resumed_at == sorted(resumed_at)  # never an earlier step
    assert stopped >= 3
    print(f"stopped {stopped} times by SIGTERM; {during_a_write} kills during a backup or "
          f"checkpoint write; resumed at (epoch, step) {resumed_at}")

    result = run_train(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final: top-1" in result.stdout
    assert [int(r["epoch"]) for r in history(workdir)] == list(range(8))
    assert json.loads((workdir / "results.json").read_text())["steps"] == 8 * 10
    assert int(keras.models.load_model(workdir / "checkpoints" / "last.keras")
               .optimizer.iterations) == 8 * 10
    keras.models.load_model(workdir / "checkpoints" / "best.keras")


class _FakeModel:
    def __init__(self, lr):
        self.optimizer = keras.optimizers.SGD(lr)


def test_plateau_schedule_divides_by_ten_at_most_three_times():
    callback = callbacks.DivideOnPlateau(factor=0.1, patience=2, max_drops=3)
    model = _FakeModel(0.01)
    callback.set_model(model)
    lrs = []
    for epoch, val_top1 in enumerate([0.1, 0.2] + [0.2] * 20):
        callback.on_epoch_end(epoch, {"val_top1": val_top1})
        lrs.append(float(model.optimizer.learning_rate))
    assert lrs[:3] == pytest.approx([0.01] * 3)
    assert lrs[3] == pytest.approx(1e-3)  # two epochs without improvement
    assert lrs[-1] == pytest.approx(1e-5) and callback.drops == 3


def test_flagfile_include_and_command_line_override(tmp_path):
    import train

    base = tmp_path / "base.cfg"
    base.write_text("--variant=cifar\n--epochs=7\n--batch_size=64\n")
    recipe = tmp_path / "recipe.cfg"
    recipe.write_text(f"--flagfile={base}\n--epochs=5\n--learning_rate=0.2\n")
    train.FLAGS.unparse_flags()
    train.FLAGS(["train.py", f"--flagfile={recipe}", "--batch_size=16"])
    config = train.config_from_flags()
    assert (config.variant, config.epochs, config.batch_size, config.learning_rate) == (
        "cifar", 5, 16, 0.2)
    train.FLAGS.unparse_flags()


@pytest.mark.parametrize(
    "name", sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".cfg")))
def test_shipped_configs_parse_and_validate(name):
    import train

    train.FLAGS.unparse_flags()
    train.FLAGS(["train.py", f"--flagfile={os.path.join(ROOT, 'configs', name)}"])
    train.config_from_flags().validate()
    train.FLAGS.unparse_flags()


def test_each_choice_is_checked_when_the_config_comes_from_python():
    choices = [f for f in dataclasses.fields(train_config.TrainConfig) if f.metadata["choices"]]
    assert {f.name for f in choices} >= {"variant", "lrn", "schedule", "strategy", "pca"}
    for field in choices:
        train_config.TrainConfig(**{field.name: field.metadata["choices"][-1]}).validate()
        with pytest.raises(train_config.TrainingError, match=f"unknown {field.name} 'bogus'"):
            train_config.TrainConfig(**{field.name: "bogus"}).validate()


@pytest.mark.slow
def test_os_errors_are_one_line(tmp_path, full_disk):
    dataset = f"--dataset={tiny_idx(tmp_path)}"
    tiny = [dataset, "--variant=cifar", "--init=keras", "--batch_size=32", "--epochs=1",
            "--steps_per_epoch=1", "--eval_steps=1"]
    # A workdir that cannot be created.
    result = run_train([*tiny, "--workdir=/proc/alexnet_tf/run"], cwd=tmp_path)
    assert_one_line_error(result, "train.py", "/proc/alexnet_tf")
    # A full disk: the first checkpoint does not fit in 1 MiB.
    result = run_train([*tiny, f"--workdir={full_disk / 'run'}"], cwd=tmp_path)
    assert_one_line_error(result, "train.py", "No space left on device")
    # A missing flagfile (absl's own error, made one line).
    result = run_train(["--flagfile=/no/such/recipe.cfg"], cwd=tmp_path)
    assert_one_line_error(result, "train.py", "/no/such/recipe.cfg")


@pytest.mark.slow
def test_a_run_on_a_read_only_filesystem_is_one_line(tmp_path, read_only_run):
    with open(read_only_run / "config.json") as f:
        dataset = json.load(f)["dataset"]
    result = run_train([f"--dataset={dataset}", "--variant=cifar", "--lrn=tf_cifar10",
                        "--init=keras", "--batch_size=32", "--epochs=2", "--steps_per_epoch=2",
                        f"--workdir={read_only_run}"], cwd=tmp_path)
    assert_one_line_error(result, "train.py", "Read-only file system", str(read_only_run))


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--variant=vgg"], "flag --variant=vgg: value should be one of <paper|single_tower|"),
    (["--dataset=imagenet"], "unknown dataset 'imagenet'"),
    (["--dataset=fashion_mnist:/no/such/dir"], "/no/such/dir/train-images-idx3-ubyte.gz not found"),
    (["--strategy=mirrored", "--cpu_replicas=2", "--batch_size=33"],
     "batch_size 33 is not divisible by the 2 replicas"),
    (["--variant=paper", "--image_size=32"], "image_size 32 is too small for variant 'paper'"),
    (["--epochs=abc"], "flag --epochs=abc: invalid literal for int()"),
])
def test_bad_flags_exit_with_one_line(tmp_path, args, message):
    dataset = [f"--dataset={tiny_idx(tmp_path)}"] if not any("dataset" in a for a in args) else []
    result = run_train([*dataset, "--variant=cifar", *args, f"--workdir={tmp_path / 'run'}"]
                       if not any("variant" in a for a in args) else
                       [*dataset, *args, f"--workdir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error:") and message in last, result.stderr[-2000:]


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="CPU detection only")
def test_auto_mixed_precision_follows_the_cpu_flags(tmp_path, monkeypatch):
    # As train.py runs: oneDNN on (whatever this process's default), not capped.
    from alexnet_tf import devices

    monkeypatch.setattr(devices, "onednn_enabled", lambda: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    with_amx = tmp_path / "amx"
    with_amx.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile\n")
    older = tmp_path / "avx2"
    older.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert strategy_lib.native_mixed_precision(str(with_amx)) == "bfloat16"
    assert strategy_lib.native_mixed_precision(str(older)) == "none"
    assert strategy_lib.native_mixed_precision(str(tmp_path / "missing")) == "none"


def test_pca_from_the_dataset_is_settled_once_and_recorded(tmp_path):
    photos = tmp_path / "photos"
    paths = write_folder_tree(photos / "train", classes=("a", "b"), per_class=3, size=(40, 50))
    write_folder_tree(photos / "val", classes=("a", "b"), per_class=1, size=(40, 50))
    inputs, run = settled_inputs(tmp_path, f"folder:{photos}")
    # Every pixel of the six images (fewer than compute_pca's sample), covariance in numpy.
    np.testing.assert_allclose(inputs.preprocess.eigval, pixel_eigenvalues(paths), rtol=1e-6)
    assert inputs.preprocess.image_size == 227 and inputs.preprocess.crop == "paper"
    assert preprocessing.PreprocessConfig.from_json(run.preprocessing) == inputs.preprocess
    with pytest.raises(dataclasses.FrozenInstanceError):
        inputs.preprocess.crop = "inception"


class _SignalAfterCalls(keras.callbacks.Callback):
    """Sends this process SIGTERM once `calls` of Keras' calls have ended (a preemption)."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def on_train_batch_end(self, batch, logs=None):
        self.calls -= 1
        if self.calls == 0:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.onednn
def test_sigterm_mid_epoch_resumes_at_its_step_on_the_same_schedule(tmp_path, monkeypatch):
    """3 epochs of 6 steps, 2 per call, cosine decay: SIGTERM after the 4th call (epoch 2, step
    2) stops the run there; the rerun (3 steps per call: the rest of epoch 2 takes 1) trains
    the 10 steps left. The step count and each epoch's learning rate are an uninterrupted
    run's."""
    config = tiny_config(tmp_path, epochs=3, steps_per_epoch=6, steps_per_execution=2,
                         schedule="cosine", learning_rate=0.05)
    whole = training.train_and_evaluate(config, str(tmp_path / "whole"))
    create_callbacks = training.create_callbacks
    monkeypatch.setattr(training, "create_callbacks", lambda *a, **k: (
        lambda made: ([_SignalAfterCalls(4), *made[0]], made[1]))(create_callbacks(*a, **k)))
    workdir = str(tmp_path / "run")
    with pytest.raises(backup_lib.Interrupted) as e:
        training.train_and_evaluate(config, workdir)
    assert (e.value.epoch, e.value.step) == (1, 2)
    assert [int(r["epoch"]) for r in history(workdir)] == [0]
    monkeypatch.setattr(training, "create_callbacks", create_callbacks)
    resumed = training.train_and_evaluate(
        dataclasses.replace(config, steps_per_execution=3), workdir)
    assert resumed["steps"] == whole["steps"] == 18
    rows, whole_rows = history(workdir), history(tmp_path / "whole")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert [float(r["learning_rate"]) for r in rows] == pytest.approx(
        [float(r["learning_rate"]) for r in whole_rows])
    # The reference: Keras' CosineDecay(0.05, 18) after 6, 12 and 18 steps.
    assert [float(r["learning_rate"]) for r in rows] == pytest.approx(
        [0.05 * 0.5 * (1 + np.cos(np.pi * s / 18)) for s in (6, 12, 18)], abs=1e-6)


_HOLD = """
import sys, time
from alexnet_tf.rundir import RunDir
with RunDir(sys.argv[1]).hold():
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(workdir):
    """A process that holds `workdir` as a training run does, until killed."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(workdir)], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_workdir_in_use_is_refused_naming_the_run_and_a_stale_lock_is_taken_over(tmp_path):
    from alexnet_tf.rundir import RunDir, RunDirInUse

    workdir = tmp_path / "run"
    proc = _holder(workdir)
    try:
        with pytest.raises(RunDirInUse, match=rf"in use by another training run \(pid "
                                              rf"{proc.pid} on host {socket.gethostname()}"):
            with RunDir(str(workdir)).hold():
                pass
    finally:
        proc.kill()  # as kill -9 would: the lock file still names it
        proc.wait()
    assert f'"pid": {proc.pid}' in (workdir / "run.lock").read_text()
    with RunDir(str(workdir)).hold():  # the kernel freed its lock with the process
        assert f'"pid": {os.getpid()}' in (workdir / "run.lock").read_text()
    assert (workdir / "run.lock").read_text() == ""  # a clean end names nobody


@pytest.mark.slow
def test_train_py_stops_at_once_in_a_workdir_another_run_holds(tmp_path):
    workdir = tmp_path / "run"
    proc = _holder(workdir)
    try:
        result = run_train([f"--dataset={tiny_idx(tmp_path)}", "--variant=cifar", "--epochs=1",
                            "--steps_per_epoch=2", "--batch_size=32", f"--workdir={workdir}"],
                           cwd=tmp_path)
    finally:
        proc.kill()
        proc.wait()
    assert_one_line_error(result, "train.py", f"pid {proc.pid}", "another --workdir")
    assert not (workdir / "history.csv").exists()


@pytest.mark.slow  # TensorFlow's allocator tries for 40 s before it gives up
def test_a_batch_that_does_not_fit_is_one_line_saying_what_to_change(tmp_path, monkeypatch):
    """A model whose training step asks the allocator for 2^46 floats (256 TiB): TensorFlow's
    ResourceExhaustedError, as a batch too large for the device's or the host's memory gets,
    comes out as one TrainingError naming the batch, the variant and what to do."""
    build_model = recipe.build_model

    def too_large(config, *args):
        model = build_model(config, *args)
        size = lambda x: tf.cast(tf.shape(x)[:1], tf.int64) * 0 + 2 ** 46  # noqa: E731
        hungry = keras.layers.Lambda(lambda x: x + tf.reduce_min(
            tf.random.stateless_uniform(size(x), [1, 2], dtype=x.dtype)))
        inputs = keras.Input(model.input_shape[1:])
        return keras.Model(inputs, model(hungry(inputs)), name=model.name)

    monkeypatch.setattr(recipe, "build_model", too_large)
    with pytest.raises(train_config.TrainingError) as e:
        training.train_and_evaluate(tiny_config(tmp_path), str(tmp_path / "run"))
    message = str(e.value)
    assert "\n" not in message and len(message) < 500
    for fragment in ("out of memory training --variant=cifar at --batch_size=32",
                     "1 replica", "OOM when allocating", "--batch_size=16"):
        assert fragment in message, message


def _wait_for_epochs(workdir, epochs, procs, seconds=240):
    """Waits until history.csv of `workdir` has `epochs` rows (or a process ended)."""
    deadline = time.time() + seconds
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if os.path.exists(workdir / "history.csv") and len(history(workdir)) >= epochs:
            return
        time.sleep(0.05)
    raise AssertionError("the run ended or stalled before the moment of the signal")


@pytest.mark.slow
def test_sigterm_under_mirrored_strategy_saves_and_the_rerun_finishes(tmp_path):
    workdir = tmp_path / "run"
    args = [f"--dataset={tiny_idx(tmp_path, n=1024)}", "--variant=cifar", "--init=keras",
            "--strategy=mirrored", "--cpu_replicas=2", "--batch_size=32", "--epochs=3",
            "--steps_per_epoch=12", "--eval_steps=1", f"--workdir={workdir}"]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args],
                            cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_epochs(workdir, 1, [proc])
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143 and "Traceback" not in out, out[-3000:]
    assert re.search(r"stopped at epoch [23] step \d+ by SIGTERM", out), out[-3000:]
    result = run_train(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [int(r["epoch"]) for r in history(workdir)] == [0, 1, 2]
    assert json.loads((workdir / "results.json").read_text())["steps"] == 3 * 12


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_every_worker_at_the_same_step(tmp_path):
    """MultiWorkerMirroredStrategy, two local workers: SIGTERM to the chief alone stops both
    after one step (they agree at each call), each saving its backup; both rerun to the end."""
    dataset = tiny_idx(tmp_path, n=1024)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    workdir = tmp_path / "run"

    def start():
        procs = []
        for index in range(2):
            tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            args = [sys.executable, os.path.join(ROOT, "train.py"), f"--dataset={dataset}",
                    "--variant=cifar", "--init=keras", "--strategy=multi_worker",
                    "--batch_size=32", "--epochs=3", "--steps_per_epoch=12", "--eval_steps=1",
                    "--backup_every_minutes=0", f"--workdir={workdir}"]
            procs.append(subprocess.Popen(
                args, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT, TF_CONFIG=tf_config),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        return procs

    procs = start()
    _wait_for_epochs(workdir, 1, procs)
    procs[0].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    stops = []
    for p, out in zip(procs, outputs):
        assert p.returncode == 143 and "Traceback" not in out, out[-3000:]
        stops.append(re.search(r"stopped at epoch (\d+) step (\d+) by SIGTERM", out).groups())
    assert stops[0] == stops[1]
    procs = start()
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    assert [int(r["epoch"]) for r in history(workdir)] == [0, 1, 2]
    assert json.loads((workdir / "results.json").read_text())["steps"] == 3 * 12
