"""The Keras work-arounds: applied inside their context only, and a clear error when Keras lacks
the internal one relies on; the oneDNN question, answered from TensorFlow's internal."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import alexnet_tf
from alexnet_tf import keras_compat
from tests.helpers import ROOT


def compiled_model():
    model = alexnet_tf.AlexNet(3, "cifar", (32, 32, 3), init="keras")
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def batch():
    return tf.zeros([2, 32, 32, 3]), tf.constant([0, 1])


def test_built_before_fit_builds_and_is_undone_afterwards():
    model = compiled_model()
    strategy = tf.distribute.get_strategy()
    assert not model.optimizer.built
    with keras_compat.built_before_fit(model, strategy, batch()):
        assert model.optimizer.built  # built from the dummy batch, before fit
        assert "_maybe_symbolic_build" in vars(model)  # fit's own build step is switched off
        model.fit(np.zeros((4, 32, 32, 3), "float32"), np.arange(4) % 3, verbose=0)
    assert "_maybe_symbolic_build" not in vars(model)  # the class's method again
    assert model._maybe_symbolic_build.__func__ is type(model)._maybe_symbolic_build


def test_scalar_reduce_patch_is_a_no_op_outside_multi_worker():
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = tf_trainer.reduce_per_replica
    with keras_compat.scalar_metrics_across_workers(tf.distribute.get_strategy()):
        assert tf_trainer.reduce_per_replica is original


def test_missing_internal_is_a_one_line_error_naming_the_keras_version(monkeypatch):
    model = compiled_model()
    owner = next(c for c in type(model).__mro__ if "_symbolic_build" in vars(c))
    monkeypatch.delattr(owner, "_symbolic_build")
    with pytest.raises(keras_compat.KerasCompatibilityError) as error:
        with keras_compat.built_before_fit(model, tf.distribute.get_strategy(), batch()):
            pass
    message = str(error.value)
    assert f"Keras {keras.__version__} has no _symbolic_build" in message
    assert keras_compat.CHECKED_KERAS_VERSIONS in message and "\n" not in message


@pytest.mark.parametrize("setting", ["0", "1"])
def test_onednn_enabled_reports_the_processes_setting(setting):
    # Its own process: TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, at start-up.
    result = subprocess.run(
        [sys.executable, "-c", "from alexnet_tf import keras_compat; "
         "print(keras_compat.onednn_enabled())"],
        capture_output=True, text=True, cwd=ROOT, check=True,
        env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": setting, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.stdout.strip() == {"0": "False", "1": "True"}[setting]


def test_missing_tensorflow_internal_is_a_one_line_error_naming_the_version(monkeypatch):
    from tensorflow.python.util import _pywrap_util_port

    monkeypatch.delattr(_pywrap_util_port, "IsMklEnabled")
    with pytest.raises(keras_compat.KerasCompatibilityError) as error:
        keras_compat.onednn_enabled()
    message = str(error.value)
    assert f"TensorFlow {tf.__version__} has no _pywrap_util_port.IsMklEnabled" in message
    assert keras_compat.CHECKED_TENSORFLOW_VERSIONS in message and "\n" not in message
