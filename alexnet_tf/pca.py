"""Eigen-pairs of the RGB pixel covariance of a user's own images, for the paper's PCA lighting
(§4.1): from a sample (--pca=dataset) or from the covariance prepare.py accumulates."""

import numpy as np


def compute_pca(images, max_pixels=1_000_000, seed=0):
    """Eigen-pairs of the RGB pixel covariance, for pixels scaled to [0, 1].

    Args:
        images: an iterable of [H, W, 3] arrays/tensors in [0, 255] (e.g. a sample of the
            training set, decoded).
        max_pixels: pixels sampled in total (uniformly from each image).
        seed: sampling seed.

    Returns:
        (eigval, eigvec): eigenvalues in decreasing order and eigenvectors as columns, the layout
        of `IMAGENET_EIGVAL` / `IMAGENET_EIGVEC`.
    """
    rng = np.random.default_rng(seed)
    pixels = [np.reshape(np.asarray(image, np.float64), (-1, 3)) / 255.0 for image in images]
    if not pixels:
        raise ValueError("compute_pca needs at least one image")
    per_image = max(1, max_pixels // len(pixels))
    sample = np.concatenate(
        [p[rng.choice(len(p), min(per_image, len(p)), replace=False)] for p in pixels]
    )
    return eigen_pairs(np.cov(sample, rowvar=False))


def eigen_pairs(covariance):
    """(eigval, eigvec) of a 3 x 3 RGB covariance in the layout of `IMAGENET_EIGVAL` /
    `IMAGENET_EIGVEC`: eigenvalues in decreasing order, eigenvectors as columns."""
    eigval, eigvec = np.linalg.eigh(np.asarray(covariance, np.float64))
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    # Fix each eigenvector's sign (first component negative, as in the ImageNet values).
    eigvec = eigvec * -np.sign(eigvec[0:1, :] + 1e-12)
    return tuple(eigval.tolist()), tuple(map(tuple, eigvec.tolist()))
