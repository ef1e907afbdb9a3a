"""Every use of a Keras or TensorFlow internal, in one place: work-arounds for two Keras bugs,
applied around `fit` and `evaluate` and undone afterwards; a training step that XLA compiles
under several replicas, which Keras' own cannot; checkpoints written atomically, which
ModelCheckpoint has no public hook for; and the question TensorFlow has no public answer to (are
its oneDNN CPU kernels on?).

Checked with the Keras (TensorFlow backend) and TensorFlow versions that CHECKED_KERAS_VERSIONS
and CHECKED_TENSORFLOW_VERSIONS name, the lowest and newest the tests run on. Each use first
checks that the internal it relies on is there, and fails with `KerasCompatibilityError`, naming
the version, when a release has renamed it: a work-around that silently stopped working would
bring its bug back unnoticed.
"""

import contextlib
import os

import keras
import tensorflow as tf

CHECKED_KERAS_VERSIONS = "3.13 and 3.15"
CHECKED_TENSORFLOW_VERSIONS = "2.20 and 2.21"


class KerasCompatibilityError(RuntimeError):
    """This Keras release lacks an internal that a work-around needs; one-line message."""


def _require(owner, name, purpose):
    if not hasattr(owner, name):
        raise KerasCompatibilityError(
            f"Keras {keras.__version__} has no {name} (needed to {purpose}); alexnet_tf was "
            f"checked with Keras {CHECKED_KERAS_VERSIONS}: install one of those")
    return getattr(owner, name)


def onednn_enabled():
    """Whether this TensorFlow process runs its oneDNN CPU kernels (TF_ENABLE_ONEDNN_OPTS, or
    TensorFlow's default for this CPU, read once when TensorFlow starts).

    TensorFlow has no public API for this; its own tests ask `_pywrap_util_port.IsMklEnabled`.
    """
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        _pywrap_util_port = None
    if not hasattr(_pywrap_util_port, "IsMklEnabled"):
        raise KerasCompatibilityError(
            f"TensorFlow {tf.__version__} has no _pywrap_util_port.IsMklEnabled (needed to tell "
            f"whether its oneDNN kernels are on); alexnet_tf was checked with TensorFlow "
            f"{CHECKED_TENSORFLOW_VERSIONS}: install one of those")
    return bool(_pywrap_util_port.IsMklEnabled())


@contextlib.contextmanager
def built_before_fit(model, strategy, data_batch):
    """Builds the compiled metrics, loss and optimizer state from `data_batch` before `fit`.

    Under a tf.distribute strategy, Keras' `fit` and `evaluate` build them from one batch pulled
    from a fresh iterator of the dataset (keras-team/keras#20394), and leave that iterator
    half-read: a cached dataset then blocks the next iterator until garbage collection frees the
    first (validation stalled for minutes between epochs). Under MultiWorkerMirroredStrategy the
    same step fails outright (tensorflow#72388). Inside this context, `fit` and `evaluate` find
    everything built and pull nothing.
    """
    symbolic_build = _require(model, "_symbolic_build", "build the model before fit")
    _require(model, "_maybe_symbolic_build", "stop fit from building it again")
    with strategy.scope():
        symbolic_build(data_batch=data_batch)
    model._maybe_symbolic_build = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del model._maybe_symbolic_build  # the class's method again


@contextlib.contextmanager
def scalar_metrics_across_workers(strategy):
    """Reduces each step's scalar metrics across workers with `axis=None`.

    Keras' TensorFlow trainer reduces them with `strategy.reduce("MEAN", v, axis=0)`, which fails
    for scalars under MultiWorkerMirroredStrategy (tensorflow#72388). A no-op for other
    strategies.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        yield
        return
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = _require(tf_trainer, "reduce_per_replica",
                        "reduce scalar metrics across workers")

    def reduce_per_replica(values, strategy_, reduction):
        if reduction in ("auto", "mean") and isinstance(
                strategy_, tf.distribute.MultiWorkerMirroredStrategy):
            return tf.nest.map_structure(lambda v: strategy_.reduce("MEAN", v, axis=None), values)
        return original(values, strategy_, reduction)

    tf_trainer.reduce_per_replica = reduce_per_replica
    try:
        yield
    finally:
        tf_trainer.reduce_per_replica = original


@contextlib.contextmanager
def fit_work_arounds(model, strategy, data_batch):
    """Both work-arounds, for the duration of a run's `fit` and `evaluate` calls."""
    with built_before_fit(model, strategy, data_batch), scalar_metrics_across_workers(strategy):
        yield


def replica_compiled_train_step(model):
    """Makes `model.train_step` compile with XLA under a strategy of several replicas.

    Keras 3 compiles `strategy.run` whole (`jit_compile=True` wraps every replica's step in one
    XLA computation on one device), so under MirroredStrategy a replica's variables on another
    device fail ("Trying to access resource .../replica_1 ... from device ...:0", XLA's known
    issue of a variable on another device). Here each replica compiles its own forward and
    backward pass, as a pure function of the variables' values (Keras' `stateless_call` and
    `stateless_compute_loss`, as its JAX trainer does), so that no variable is touched inside
    XLA; the variables are read before it, and the optimizer's update (with its cross-replica
    sum), the dropout seeds' new state and the metrics are applied after it, on the replica's
    device. Compile the model with `jit_compile=False`: the step compiles itself.
    """
    for name in ("stateless_call", "stateless_compute_loss", "_loss_tracker"):
        _require(model, name, "compile each replica's training step with XLA")
    from keras.src.losses import loss as loss_module
    from keras.src.trainers.data_adapters import data_adapter_utils

    unscale = _require(loss_module, "unscale_loss_for_distribution",
                       "compile each replica's training step with XLA")
    unpack = _require(data_adapter_utils, "unpack_x_y_sample_weight",
                      "compile each replica's training step with XLA")

    @tf.function(jit_compile=True, reduce_retracing=True)
    def forward_backward(trainable, non_trainable, metrics, x, y, sample_weight):
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            y_pred, non_trainable = model.stateless_call(trainable, non_trainable, x,
                                                         training=True)
            loss, (_, non_trainable, _) = model.stateless_compute_loss(
                trainable, non_trainable, metrics, x=x, y=y, y_pred=y_pred,
                sample_weight=sample_weight, training=True)
            scaled = model.optimizer.scale_loss(loss)
        return loss, tape.gradient(scaled, trainable), non_trainable, y_pred

    def train_step(data):
        x, y, sample_weight = unpack(data)
        loss, gradients, non_trainable, y_pred = forward_backward(
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            [v.value for v in model.metrics_variables], x, y, sample_weight)
        for variable, value in zip(model.non_trainable_variables, non_trainable):
            variable.assign(value)
        model._loss_tracker.update_state(unscale(loss), sample_weight=tf.shape(x)[0])
        model.optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    model.train_step = train_step
    return model


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint that writes beside its file and renames into place: a crash mid-write
    leaves the previous checkpoint whole. Keras' own writes the file in place, through
    `_save_model`, the one method that knows the path at the time of writing; it is overridden
    here, once its presence is checked."""

    def __init__(self, filepath, when=None, **kwargs):
        """`when`: a function of the epoch (0-based) that says whether its end saves (default:
        every epoch end saves, as ModelCheckpoint's)."""
        _require(keras.callbacks.ModelCheckpoint, "_save_model",
                 "write checkpoints beside their file and rename them into place")
        super().__init__(filepath, **kwargs)
        self.when = when

    def on_epoch_end(self, epoch, logs=None):
        if self.when is None or self.when(epoch):
            super().on_epoch_end(epoch, logs)

    def _save_model(self, epoch, batch, logs):
        final = self.filepath
        directory, name = os.path.split(final)
        temporary = os.path.join(directory, f".tmp-{name}")  # keeps the .keras ending
        if os.path.exists(temporary):
            os.remove(temporary)  # left by a crash
        self.filepath = temporary
        try:
            super()._save_model(epoch, batch, logs)
        finally:
            self.filepath = final
        if os.path.exists(temporary):  # not written when save_best_only saw no improvement
            os.replace(temporary, final)
