"""Packaging for alexnet_tf."""

from setuptools import find_packages, setup

BENCH = ["openvino>=2026.4", "onnxruntime>=1.32", "tf2onnx>=1.17", "onnx>=1.23"]
# export.py --format=litert|onnx|openvino: the converters (LiteRT's is TensorFlow's own) and the
# runtimes that run each file. Floors: the versions tested.
EXPORT = ["ai-edge-litert>=2.3", "onnxruntime>=1.32", "tf2onnx>=1.17", "onnx>=1.23",
          "openvino>=2026.4"]

setup(
    name="alexnet_tf",
    version="0.1.0",
    description="AlexNet (Krizhevsky et al., 2012) in TensorFlow / Keras 3: faithful, fast, servable.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["alexnet_tf", "alexnet_tf.*"]),
    # Keras 3.13 needs Python 3.11.
    python_requires=">=3.11",
    # Floors: the lowest versions the tests pass with (.ci/run installs them from .ci/lowest.txt).
    # Keras 3.13 brings AdaptiveAveragePooling2D (one_weird_trick). TensorFlow 2.16-2.18 cap
    # protobuf below 5 or 6, and today's tensorflow-datasets (its tensorflow-metadata) needs 6.
    install_requires=[
        "tensorflow>=2.20,<3",
        "keras>=3.13,<4",
        "tensorflow-datasets",
        "numpy",
        "absl-py",
        "tensorboard",  # TF >= 2.20 no longer installs it; train.py writes TensorBoard logs
        "matplotlib",  # alexnet_tf.visualize curves
    ],
    extras_require={
        "gpu": ["tensorflow[and-cuda]>=2.20,<3"],
        # Reading torchvision .pth weights (alexnet_tf.weights.load_torchvision).
        "torch": ["torch>=2.0"],
        # Runtimes users serve the export with instead of TensorFlow, each given predict_images:
        # benchmarks/peers.py compares them, tests/test_runtimes.py checks their answers.
        # Floors: the versions tested.
        "bench": BENCH,
        "export": EXPORT,
        # tensorflow-serving-api: the tests build PredictRequest protos as a TF Serving client would.
        # torch: the weight-import tests compare against PyTorch reference networks; 2.13.0 is
        # pinned because it is the CPU build this project's CI machines hold offline (an unpinned
        # torch pulls a CUDA build of several GB). nbclient/ipykernel: the notebook test.
        # pillow: the tests write and read images with it. A test whose package is missing
        # fails, naming it (tests/helpers.require).
        "test": ["pytest", "tensorflow-serving-api", "torch==2.13.0", "nbclient", "nbformat",
                 "ipykernel", "pillow", *sorted(set(BENCH + EXPORT))],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
