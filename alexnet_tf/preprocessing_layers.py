"""The Keras preprocessing layers: the paper's PCA lighting as a layer for users' own pipelines,
and the device side of the training pipeline (InputStage)."""

import random

import keras
import tensorflow as tf

from alexnet_tf.preprocessing import (IMAGENET_EIGVAL, IMAGENET_EIGVEC, PCA_ALPHA_STD,
                                      augment_batch, normalize, pca_lighting)


@keras.saving.register_keras_serializable(package="alexnet_tf")
class PCALighting(keras.layers.Layer):
    """Keras preprocessing layer for the paper's PCA colour augmentation (§4.1).

    Active only with `training=True` (like `keras.layers.RandomFlip`), so it can sit at the
    front of a model or in a `tf.data` map of a user's own `model.fit` pipeline.

    Args:
        eigval, eigvec: eigen-pairs for RGB in [0, 1] (default: ImageNet, fb.resnet.torch).
        alpha_std: standard deviation of the per-image coefficients (paper: 0.1).
        pixel_scale: pixel range of the inputs (255 for [0, 255], 1 for [0, 1]).
        seed: optional int seed.

    Example:
        >>> layer = PCALighting()
        >>> layer(tf.zeros([2, 8, 8, 3]), training=True).shape
        TensorShape([2, 8, 8, 3])
    """

    def __init__(
        self,
        eigval=IMAGENET_EIGVAL,
        eigvec=IMAGENET_EIGVEC,
        alpha_std=PCA_ALPHA_STD,
        pixel_scale=255.0,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.eigval = tuple(float(v) for v in eigval)
        self.eigvec = tuple(tuple(float(v) for v in row) for row in eigvec)
        self.alpha_std = float(alpha_std)
        self.pixel_scale = float(pixel_scale)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=False):
        if not training:
            return inputs
        batch_shape = tf.shape(inputs)[:-3]
        alpha = keras.random.normal(
            tf.concat([batch_shape, [3]], 0), stddev=self.alpha_std, seed=self.seed_generator
        )
        shifted = pca_lighting(inputs, alpha, self.eigval, self.eigvec, self.pixel_scale)
        return tf.cast(shifted, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            eigval=self.eigval,
            eigvec=self.eigvec,
            alpha_std=self.alpha_std,
            pixel_scale=self.pixel_scale,
            seed=self.seed,
        )
        return config


class InputStage(keras.layers.Layer):
    """The device side of the input pipeline: uint8 crops in, model inputs out.

    `data.make_dataset` stops at uint8 crops (4x fewer bytes than float32 to copy to an
    accelerator) and this stage runs first in each training and evaluation step, on the
    device: the float cast, and in training only the random horizontal flip and PCA lighting
    (paper §4.1); then normalisation (`normalize`). It is not part of the model, so exported
    models keep their serving preprocessing (`eval_image` on encoded bytes). `data.on_host`
    runs the same functions in the pipeline instead.

    Its random draws are stateless. Inside a training step (`run_input_stage`) they are
    a function of the seed, the optimizer's step count and the replica: no variable is read or
    written, which XLA needs under a multi-device strategy (a replica's step may not touch a
    variable of another device), and a run resumed at step S draws what an uninterrupted run
    draws at S. Called on its own (a tf.data map, a notebook), it draws from a SeedGenerator.

    Args:
        preprocess: the run's `PreprocessConfig` (flip, eigen-pairs, mean/std, BGR).
        seed: optional int seed of the flips and lighting coefficients.

    Inputs are [B, H, W, C] in [0, 255]; in inference also [B, 10, H, W, C] (ten-crop views).
    """

    def __init__(self, preprocess, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.preprocess = preprocess
        self.seed = seed
        # Without a seed, each stage draws its own base, so that two runs differ.
        self.base_seed = seed if seed is not None else random.randrange(2**31)
        # Drawn from only outside a training step: a step never reads it.
        self.seed_generator = keras.random.SeedGenerator(self.base_seed)

    def call(self, images, training=False, step=None):
        """`step`: the step count (an int tensor) when called in a training step; the seed is
        then folded from (seed, step, replica)."""
        if not training:
            return normalize(tf.cast(images, tf.float32), self.preprocess)
        # A batch [B, H, W, C]: the training pipeline's per-batch augmentation.
        if step is None:
            return augment_batch(images, self.seed_generator.next(), self.preprocess)
        return augment_batch(images, step_seed(self.base_seed, step), self.preprocess)

    def compute_output_shape(self, input_shape):
        return input_shape


def step_seed(base, step):
    """The stateless [2] seed of training step `step` on this replica: (base, step) folded with
    the replica's index, so that replicas draw differently and a step draws the same whenever it
    runs."""
    replica = tf.distribute.get_replica_context()
    index = 0 if replica is None else replica.replica_id_in_sync_group
    seed = tf.stack([tf.constant(base, tf.int64), tf.cast(step, tf.int64)])
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(index, tf.int64))


def run_input_stage(model, stage):
    """Makes `stage` (an `InputStage`) the first part of the model's train, test and predict
    steps, so that it runs on the model's device on each batch of uint8 crops that
    `data.make_dataset` yields: with training=True in training steps only, its random draws
    seeded by the optimizer's step count (read, never written by the stage, so that the step
    compiles with XLA under every strategy). The model itself (its layers, checkpoints and
    exports) is unchanged."""

    def staged(step, training):
        def step_with_stage(data):
            images, *rest = data if isinstance(data, tuple) else (data,)
            if training:
                images = stage(images, training=True, step=model.optimizer.iterations)
            else:
                images = stage(images, training=False)
            return step((images, *rest))

        return step_with_stage

    model.train_step = staged(model.train_step, True)
    model.test_step = staged(model.test_step, False)
    model.predict_step = staged(model.predict_step, False)
    return model
