"""Packaging for alexnet_tf."""

from setuptools import find_packages, setup

setup(
    name="alexnet_tf",
    version="0.1.0",
    description="AlexNet (Krizhevsky et al., 2012) in TensorFlow / Keras 3: faithful, fast, servable.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["alexnet_tf", "alexnet_tf.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16,<3",
        "tensorflow-datasets",
        "keras-cv",
        "numpy",
        "absl-py",
        "tensorboard",  # TF >= 2.20 no longer installs it; train.py writes TensorBoard logs
    ],
    extras_require={
        "gpu": ["tensorflow[and-cuda]>=2.16,<3"],
        # tensorflow-serving-api: the tests build PredictRequest protos as a TF Serving client would.
        "test": ["pytest", "tensorflow-serving-api"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
