"""The training run: the compiled model (its recipe: alexnet_tf.recipe) and its callbacks,
resuming, the final evaluation and the report.

`train_and_evaluate(config, workdir)` is the library entry point; `train.py` only turns flags
into a `train_config.TrainConfig` and calls it.
"""

import contextlib
import json
import math
import os
import re
import signal
import time
import warnings

import keras
import tensorflow as tf
from absl import logging

from alexnet_tf import backup as backup_lib, devices
from alexnet_tf import inputs as inputs_lib, keras_compat, layers, model as model_lib
from alexnet_tf import preprocessing, preprocessing_layers, recipe, sources
from alexnet_tf import strategy as strategy_lib, weights
from alexnet_tf.callbacks import DivideOnPlateau, EpochReport, StopOnNaN
from alexnet_tf.rundir import RunDir, RunDirInUse
from alexnet_tf.train_config import RESUME_SETTINGS, TrainingError


# --------------------------------------------------------------------------------------------
# The run


def _write_image_grid(run, dataset, preprocess):
    """Logs a grid of augmented training images to TensorBoard (de-normalised for viewing)."""
    images, _ = next(iter(dataset.take(1)))
    stage = preprocessing_layers.InputStage(preprocess)
    images = preprocessing.denormalize(stage(images[:16], training=True), preprocess)
    with tf.summary.create_file_writer(os.path.join(run.tensorboard, "train")).as_default():
        tf.summary.image("augmented_training_images", tf.clip_by_value(images / 255.0, 0, 1),
                         step=0, max_outputs=16)


def _dummy_batch(model, strategy, num_classes):
    """One global batch of zeros of the model's input shape (for building before fit)."""
    replicas = strategy.num_replicas_in_sync
    return (tf.zeros([replicas, *model.input_shape[1:]]),
            tf.zeros([replicas], tf.int32) % num_classes)


@contextlib.contextmanager
def _validation_runs_out_quietly():
    """A validation pipeline of files does not know its length (an image can prove unreadable
    when read, and is then skipped), so Keras learns it by running out of data and warns "Your
    input ran out of data" after the first evaluation: expected here (the training pipeline
    repeats forever), so not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        yield


# --------------------------------------------------------------------------------------------
# The run, step by step


def check_weights_and_source(config):
    """TrainingError or sources.DataError (one line), before anything is read or trained, when
    the weights of --init_from do not fit the model or --dataset names no kind of source."""
    if config.init_from:
        try:
            weights.check_fits(config.init_from, config.variant, config.lrn)
        except weights.WeightsError as e:
            raise TrainingError(str(e)) from None
    sources.parse_source(config.dataset)


def check_resumable(config, run):
    """TrainingError, before anything is read or loaded, when the workdir holds a run whose
    settings of the model or the data (RESUME_SETTINGS) differ from `config`'s: resuming would
    load weights of another shape or train on other data."""
    if config.start_over or not os.path.exists(run.config):
        return
    try:
        saved = run.train_config()
    except (OSError, ValueError, TypeError) as e:
        raise TrainingError(f"cannot resume: {run.config} is unreadable ({e})") from None
    differ = [f"--{name}={getattr(config, name)} (the run has {getattr(saved, name)})"
              for name in RESUME_SETTINGS if getattr(saved, name) != getattr(config, name)]
    if differ:
        raise TrainingError(
            f"cannot resume {run.path} with other settings: {', '.join(differ)}; give another "
            "--workdir for a new run, or --start_over to discard this one's backup, history and "
            "preprocessing and train it from the first epoch")


def _steps_per_epoch(config, train_info):
    steps = config.steps_per_epoch
    if steps is None:
        if train_info.num_examples is None:
            raise TrainingError(f"{config.dataset}: size unknown; pass --steps_per_epoch")
        steps = train_info.num_examples // config.batch_size
    if steps < 1:
        raise TrainingError(f"batch_size {config.batch_size} is larger than the training split")
    return steps


def step_settings(config, strategy, steps_per_epoch, facts=None):
    """(jit_compile, steps_per_execution) of a run: --jit_compile and --steps_per_execution, or
    where they say auto, what `devices` decides for this machine (`facts`)."""
    facts = facts or devices.DeviceFacts.of_this_machine()
    jit = (devices.jit_compile(facts) if config.jit_compile == "auto"
           else config.jit_compile == "true")
    replicas = strategy.num_replicas_in_sync
    per_call = config.steps_per_execution or devices.steps_per_execution(facts, steps_per_epoch,
                                                                         replicas)
    if config.steps_per_execution > 1 and replicas > 1:
        raise TrainingError(f"--steps_per_execution={per_call} fails with {replicas} replicas "
                            "(Keras 3 feeds the steps after a call's first one nothing); give 1 "
                            "or 0 (auto)")
    if config.steps_per_execution and steps_per_epoch % per_call:
        raise TrainingError(f"--steps_per_execution={per_call} does not divide the "
                            f"{steps_per_epoch} steps of an epoch; give a divisor, or 0 (auto)")
    return jit, per_call


def create_model(config, inputs, strategy, steps_per_epoch, resuming):
    """The compiled model: built under the strategy, started from --init_from unless the run
    resumes from its backup, layers frozen as --trainable says, weight decay on the kernels,
    the input stage in its steps, XLA and steps per call as `step_settings` says."""
    pre = inputs.preprocess
    jit, per_call = step_settings(config, strategy, steps_per_epoch)
    # Keras compiles strategy.run whole under XLA, which fails with several replicas; then each
    # replica's step compiles itself (keras_compat.replica_compiled_train_step). Passed
    # explicitly: Keras turns jit_compile="auto" off under any strategy.
    per_replica = jit and strategy.num_replicas_in_sync > 1
    with strategy.scope():
        model = recipe.build_model(config, inputs.num_classes, pre.image_size, pre.channels)
        try:
            if config.init_from and not resuming:
                weights.load_weights(model, config.init_from, trust=config.trust_weights,
                                     new_head=True)
            trainable = weights.set_trainable(model, config.trainable)
        except weights.WeightsError as e:
            raise TrainingError(str(e)) from None
        if config.trainable != "all":
            logging.info("Training %s; the other layers are frozen", ", ".join(trainable))
        recipe.add_weight_decay(model, config.weight_decay)
        model.compile(
            optimizer=recipe.optimizer(config, steps_per_epoch),
            loss=recipe.loss(config),
            metrics=[
                keras.metrics.SparseCategoricalAccuracy(name="top1"),
                keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, inputs.num_classes),
                                                            name="top5"),
            ],
            jit_compile=jit and not per_replica,
            steps_per_execution=per_call,
        )
        if per_replica:
            keras_compat.replica_compiled_train_step(model)
        preprocessing_layers.run_input_stage(
            model, preprocessing_layers.InputStage(pre, seed=config.seed))
    logging.info("Training step: XLA %s, %d step(s) per call", "on" if jit else "off", per_call)
    return model


# The share of a run's time that its backups may take (the last checkpoint, written with each,
# about as much again): a backup comes at most --backup_every_minutes after the previous one,
# sooner when it saves quickly.
BACKUP_OVERHEAD = 0.01


def create_callbacks(config, run, steps_per_epoch, skipped, chief):
    """(the callbacks in the order Keras calls them at an epoch's end, the Backup among them).
    The backup comes last, so that everything the epoch wrote is in place when the state that
    skips it is committed; it keeps the plateau counters and the best checkpoint's metric."""
    best = keras_compat.AtomicModelCheckpoint(run.checkpoint("best"), monitor="val_top1",
                                            mode="max", save_best_only=True)
    plateau = (DivideOnPlateau(config.lr_decay, config.plateau_patience, config.max_lr_drops)
               if config.schedule == "plateau" else None)
    keep = {"best_checkpoint": (best, ["best"])}
    if plateau is not None:
        keep["plateau"] = (plateau, list(DivideOnPlateau.STATE))
    backup = backup_lib.Backup(run.backup, save_freq=config.checkpoint_every_steps or "epoch",
                               keep=keep, history_csv=run.history,
                               every_seconds=60 * config.backup_every_minutes,
                               overhead=BACKUP_OVERHEAD)
    stop_on_nan = StopOnNaN(steps_per_epoch)
    callbacks = [
        stop_on_nan,
        *([plateau] if plateau is not None else []),
        EpochReport(config.batch_size, steps_per_epoch, config.epochs, skipped, verbose=chief),
        keras.callbacks.CSVLogger(run.history, append=True),
        # Written when the backup is: both are the paper model's 0.2-0.5 GB.
        keras_compat.AtomicModelCheckpoint(run.checkpoint("last"), when=backup.due_at_epoch_end),
        best,
        keras.callbacks.TensorBoard(run.tensorboard),
        backup,
    ]
    return callbacks, backup


def fit(model, config, strategy, inputs, datasets, steps_per_epoch, callbacks, chief):
    """Resumes from the backup (at its step: the rest of a half-done epoch first), trains to
    config.epochs and evaluates; (results, seconds). A termination signal during training
    backs up at the next step boundary and raises backup.Interrupted; a batch that does not fit
    in memory raises a one-line TrainingError."""
    train_ds, val_ds = datasets
    backup = next(c for c in callbacks if isinstance(c, backup_lib.Backup))
    stop_on_nan = next(c for c in callbacks if isinstance(c, StopOnNaN))
    start = time.perf_counter()
    work_arounds = keras_compat.fit_work_arounds(
        model, strategy, _dummy_batch(model, strategy, inputs.num_classes))
    with work_arounds, _validation_runs_out_quietly(), _out_of_memory_explained(config, strategy):
        try:
            epoch = backup.restore(model)
        except backup_lib.BackupError as e:
            raise TrainingError(f"{e}; --start_over discards the backup and trains from the "
                                "first epoch") from None
        step = backup.resume_step
        if (epoch or step) and chief:
            logging.info("Resuming from the backup in %s at epoch %d, step %d", backup.directory,
                         epoch + 1, step)
        # A run resumed mid-epoch trains the rest of that epoch as a fit of its own.
        fits = [(epoch, epoch + 1, steps_per_epoch - step)] if step else []
        if epoch + bool(step) < config.epochs:
            fits.append((epoch + bool(step), config.epochs, steps_per_epoch))
        per_call = model.steps_per_execution
        with backup_lib.StopSignals(_signal_agreement(strategy)) as stop:
            backup.stop = stop
            for first, last, steps in fits:
                backup.start_epoch_at(steps_per_epoch - steps)
                stop_on_nan.first_step = steps_per_epoch - steps
                _set_steps_per_call(model, math.gcd(per_call, steps))
                model.fit(
                    train_ds,
                    initial_epoch=first,
                    epochs=last,
                    steps_per_epoch=steps,
                    validation_data=val_ds,
                    callbacks=callbacks,
                    shuffle=False,  # the tf.data pipeline shuffles
                    # A progress bar on a terminal; in logs EpochReport's one line per epoch.
                    verbose=1 if os.isatty(1) else 0,
                )
                if stop_on_nan.bad_step is not None:
                    break
        train_seconds = time.perf_counter() - start
        if stop_on_nan.bad_step is not None:
            epoch, batch, step = stop_on_nan.bad_step
            raise TrainingError(
                f"loss became NaN/inf at step {step} (epoch {epoch + 1}, batch {batch + 1}); "
                "lower --learning_rate or check the data")
        results = model.evaluate(val_ds, return_dict=True, verbose=0)
    results = {k: float(v) for k, v in results.items()}
    # Read through TensorFlow: int() of a Keras variable fails on a MirroredVariable.
    results["steps"] = int(tf.convert_to_tensor(model.optimizer.iterations.value))
    return results, train_seconds


def _signal_agreement(strategy):
    """With several workers, StopSignals' `agree`: a signal on any worker stops them all after
    the same step (one all-reduce of a number per call of steps); None with one worker."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.cluster_spec().num_tasks("worker") in (None, 0, 1):
        return None

    def agree(signum):
        votes = strategy.run(lambda: tf.constant(signum, tf.int32))
        if int(strategy.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None)) == 0:
            return 0
        return signum or int(signal.SIGTERM)  # another worker's: the signal of a preemption

    return agree


def _set_steps_per_call(model, per_call):
    """Keras' calls of `per_call` steps from the next fit on (a resumed epoch's rest may not
    divide by the run's: Keras would run past its end)."""
    if model.steps_per_execution != per_call:
        model.steps_per_execution = per_call
        model.train_function = None  # traced again, with the new count


@contextlib.contextmanager
def _out_of_memory_explained(config, strategy):
    """A batch that does not fit in the device's or the host's memory: one line saying what was
    asked for and what to change, instead of TensorFlow's allocator report."""
    try:
        yield
    except tf.errors.ResourceExhaustedError as e:
        replicas = strategy.num_replicas_in_sync
        asked = re.search(r"OOM when allocating tensor with shape\[[^\]]*\][^\n]*", str(e.message))
        first = asked.group(0) if asked else "TensorFlow's allocator ran out"
        raise TrainingError(
            f"out of memory training --variant={config.variant} at --batch_size="
            f"{config.batch_size} ({config.batch_size // replicas} per replica on {replicas} "
            f"replica(s)) in {keras.mixed_precision.global_policy().name} ({first}); halve "
            f"--batch_size (--batch_size={max(config.batch_size // 2, replicas)}) until it fits, "
            "or use bfloat16/float16 where the hardware has it") from None


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

    One process trains in a workdir at a time (RunDir.hold): TrainingError when another holds
    it. SIGTERM or SIGINT during training backs up at the next step boundary and raises
    backup.Interrupted, saying where a rerun continues.

    Returns:
        dict of final metrics (loss, top1, top5, top1_error, top5_error, ten_crop_* if asked,
        steps: the optimizer's steps in all, train_seconds).
    """
    config.validate()
    check_weights_and_source(config)
    check_resumable(config, RunDir(workdir))
    strategy = strategy_lib.set_up_process(config)
    chief = strategy_lib.is_chief(strategy)
    run = RunDir(workdir) if chief else RunDir(workdir).worker(strategy.cluster_resolver.task_id)
    try:
        with run.hold():
            return _train_and_evaluate(config, workdir, strategy, chief, run)
    except RunDirInUse as e:
        raise TrainingError(str(e)) from None


def _train_and_evaluate(config, workdir, strategy, chief, run):
    run.create(start_over=config.start_over)
    source = inputs_lib.source_of(config)
    inputs_lib.check_splits(config, source)
    inputs = inputs_lib.prepare_inputs(config, run, source)
    device = devices.input_device(devices.DeviceFacts.of_this_machine(),
                                  strategy is not tf.distribute.get_strategy())
    train_ds, skipped = inputs.dataset("train", True, device=device)
    # --eval_steps ends the validation pipeline itself: Keras' calls of several steps would
    # run past a `validation_steps` that they do not divide.
    val_ds, _ = inputs.dataset("validation", False, device=device, batches=config.eval_steps)
    steps_per_epoch = _steps_per_epoch(config, inputs.info)
    # Images skipped on tf.data service workers are logged there; their count stays there.
    skipped = None if config.data_service else skipped
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
            stage=preprocessing_layers.InputStage(inputs.preprocess)))
    results["train_seconds"] = train_seconds
    if chief:
        report(results, RunDir(workdir))
    return results


def evaluate_ten_crop(model, dataset, steps=None, stage=None):
    """Paper §4.1 test-time averaging: mean softmax over the 10 crops of each image. `stage`:
    the InputStage of make_dataset's uint8 crops."""
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
