"""Size against fidelity of prepare.py's JPEG quality, to choose its default.

Prepares ImageNet-like JPEGs cut from scikit-image's photographs (as benchmarks/input_pipeline.py
writes them) to the paper's 256 x 256 pixels, encodes those pixels at each quality and reports
the mean KiB per image, the PSNR and mean absolute error against the pixels before encoding, and
the size of ImageNet's 1,281,167 + 50,000 images at that quality (the mean here times the count;
ImageNet's photographs are busier than some of these, so take it as a lower bound within ~20%).

    pip install scikit-image && python benchmarks/prepare_quality.py --images=300
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import common  # noqa: E402

flags.DEFINE_integer("images", 300, "JPEG files to generate.")
flags.DEFINE_list("qualities", ["75", "85", "90", "92", "95", "98"], "JPEG qualities.")
FLAGS = flags.FLAGS
IMAGENET_IMAGES = 1_281_167 + 50_000


def main(argv):
    del argv
    import glob

    import numpy as np
    import tensorflow as tf

    from alexnet_tf import prepare

    root = tempfile.mkdtemp(prefix="alexnet_quality_")
    common.make_jpegs(root, FLAGS.images)
    pixels = [prepare._rescaled(tf.io.decode_jpeg(tf.io.read_file(path), channels=3), False)
              for path in sorted(glob.glob(os.path.join(root, "train", "*", "*.jpg")))]
    print(f"{len(pixels)} images at 256 x 256; ImageNet size = mean x {IMAGENET_IMAGES:,}")
    print("| quality | KiB per image | PSNR (dB) | mean abs error (levels) | ImageNet on disk |")
    print("|---|---|---|---|---|")
    for quality in (int(q) for q in FLAGS.qualities):
        sizes, psnrs, errors = [], [], []
        for image in pixels:
            encoded = tf.io.encode_jpeg(image, quality=quality)
            decoded = tf.io.decode_jpeg(encoded).numpy().astype(np.float64)
            difference = decoded - image.numpy()
            sizes.append(len(encoded.numpy()))
            psnrs.append(10 * np.log10(255**2 / max(np.mean(difference**2), 1e-12)))
            errors.append(np.abs(difference).mean())
        mean_size = float(np.mean(sizes))
        print(f"| {quality} | {mean_size / 1024:.1f} | {np.mean(psnrs):.1f} | "
              f"{np.mean(errors):.2f} | {mean_size * IMAGENET_IMAGES / 1e9:.0f} GB |", flush=True)


if __name__ == "__main__":
    app.run(main)
