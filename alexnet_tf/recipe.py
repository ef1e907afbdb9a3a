"""A run's recipe (paper §5 and its variations): the model a TrainConfig describes, its
learning-rate schedule, optimizer, weight decay and loss. training.create_model compiles them."""

import keras

from alexnet_tf import model as model_lib


def build_model(config, num_classes, image_size, channels):
    """The AlexNet of a config, not compiled (training.create_model compiles it)."""
    return model_lib.AlexNet(
        num_classes=num_classes,
        variant=config.variant,
        input_shape=(image_size, image_size, channels),
        lrn=None if config.lrn == "none" else config.lrn,
        init=config.init,
        dropout=config.dropout,
    )


def learning_rate(config, steps_per_epoch):
    """The learning rate or its schedule: --schedule (cosine with --warmup_epochs, Caffe's step,
    or a constant that DivideOnPlateau changes), from --learning_rate scaled by --scale_lr_batch."""
    lr = config.learning_rate
    if config.scale_lr_batch:
        lr *= config.batch_size / config.scale_lr_batch
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if config.schedule == "cosine":
        total = config.epochs * steps_per_epoch
        if warmup:
            return keras.optimizers.schedules.CosineDecay(
                0.0, total - warmup, warmup_target=lr, warmup_steps=warmup)
        return keras.optimizers.schedules.CosineDecay(lr, total)
    if config.schedule == "step":  # Caffe "step": lr * gamma^floor(iter / stepsize)
        return keras.optimizers.schedules.ExponentialDecay(
            lr, config.step_size, config.lr_decay, staircase=True)
    return lr  # constant, or plateau (changed by DivideOnPlateau)


def optimizer(config, steps_per_epoch):
    """SGD with momentum (paper §5), or Adam."""
    lr = learning_rate(config, steps_per_epoch)
    if config.optimizer == "adam":
        return keras.optimizers.Adam(lr)
    return keras.optimizers.SGD(lr, momentum=config.momentum)


def add_weight_decay(model, weight_decay):
    """L2 weight decay on the trainable kernels of `model`."""
    # Paper §5's update v <- 0.9 v - 0.0005 eps w - eps grad is momentum SGD on loss +
    # (0.0005 / 2) ||w||^2. Kernels only: Caffe's reference model does not decay biases.
    if not weight_decay:
        return
    regularizer = keras.regularizers.L2(weight_decay / 2)
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is not None and layer.trainable:  # frozen layers: a constant, skip it
            kernel.regularizer = regularizer


def loss(config):
    """Cross-entropy of the logits against the integer labels."""
    del config  # one loss for every recipe
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
