"""alexnet_tf: AlexNet (Krizhevsky, Sutskever & Hinton, NIPS 2012) in TensorFlow / Keras 3."""

from alexnet_tf.layers import GroupedConv2D
from alexnet_tf.lrn import LRN_PRESETS, LocalResponseNormalization
from alexnet_tf.model import VARIANTS, AlexNet

__version__ = "0.1.0"

__all__ = [
    "AlexNet",
    "GroupedConv2D",
    "LocalResponseNormalization",
    "LRN_PRESETS",
    "VARIANTS",
]
