"""Preprocessing ops, each checked eagerly and inside tf.data.map, against numpy references."""

import io

import numpy as np
import pytest
import tensorflow as tf

from alexnet_tf import image_bytes, pca, preprocessing, preprocessing_layers
from alexnet_tf.preprocessing import PreprocessConfig
from tests.helpers import encode, jpeg_bomb, png_bomb, smooth_image

PHOTO = PreprocessConfig(image_size=227, resize_size=256)


def run(fn, *args, mode):
    """Runs fn(*args) eagerly or as the map function of a one-element tf.data pipeline."""
    if mode == "eager":
        return fn(*args)
    ds = tf.data.Dataset.from_tensors(tuple(args)).map(fn)
    return next(iter(ds))


MODES = ["eager", "tf.data"]


def find_window(window, image):
    """Offsets (top, left) where `window` appears exactly in `image`, or None."""
    h, w = window.shape[:2]
    for top in range(image.shape[0] - h + 1):
        for left in range(image.shape[1] - w + 1):
            if np.array_equal(image[top : top + h, left : left + w], window):
                return top, left
    return None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_paper_crop_is_a_window_of_the_central_square(mode, fmt):
    # Shorter side already 256: the window needs no resampling, so it must match exactly.
    image = smooth_image(256, 300, seed=1)
    encoded = encode(image, fmt)
    reference = tf.io.decode_image(encoded).numpy().astype(np.float32)
    square = reference[:, 22:278]  # central 256 x 256
    crop = run(lambda x, s: preprocessing.paper_crop(x, s, PHOTO), encoded, [1, 2], mode=mode)
    assert crop.shape == (227, 227, 3) and crop.dtype == tf.float32
    if fmt == "png":
        assert find_window(crop.numpy(), square) is not None
    else:  # JPEG decoded with the fused crop: same pixels up to IDCT/upsampling rounding
        best = min(
            np.abs(crop.numpy() - square[t : t + 227, l : l + 227]).mean()
            for t in range(30) for l in range(30))
        assert best < 1.5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(375, 500), (500, 375)])
def test_paper_window_lies_in_the_central_square_and_covers_it(mode, shape):
    side = int(np.round(min(shape) * 227 / 256))  # 333: the 227 crop of the 256 rescale
    slack = min(shape) - side
    square = ((shape[0] - min(shape)) // 2, (shape[1] - min(shape)) // 2)

    def window(i):
        return tf.stack(preprocessing.paper_window(tf.constant(shape), tf.stack([i, 7]), PHOTO))

    seeds = tf.range(2000)
    if mode == "eager":
        windows = np.stack([window(i).numpy() for i in seeds])
    else:
        windows = next(iter(tf.data.Dataset.from_tensor_slices(seeds).map(window).batch(2000)))
    windows = np.asarray(windows)
    assert (windows[:, 2:] == side).all()
    dy, dx = windows[:, 0] - square[0], windows[:, 1] - square[1]
    assert (0 <= dy).all() and (dy <= slack).all() and (0 <= dx).all() and (dx <= slack).all()
    # Random in both directions over the whole slack: ~1,220 of the 43 x 43 positions expected
    # in 2,000 uniform draws, both ends of each range reached.
    assert len(set(zip(dy, dx))) > 1000
    for offsets in (dy, dx):
        assert offsets.min() == 0 and offsets.max() == slack


@pytest.mark.parametrize("mode", MODES)
def test_jpeg_path_without_the_branch_gives_the_same_crops(mode):
    encoded = encode(smooth_image(300, 400, seed=7), "jpeg")
    for crop in (preprocessing.paper_crop, preprocessing.inception_crop):
        branched = run(lambda x, s: crop(x, s, PHOTO), encoded, [8, 9], mode=mode)
        direct = run(lambda x, s: crop(x, s, PHOTO, jpeg=True), encoded, [8, 9], mode=mode)
        np.testing.assert_array_equal(branched.numpy(), direct.numpy())
    branched = run(lambda x: preprocessing.eval_image(x, PHOTO), encoded, mode=mode)
    direct = run(lambda x: preprocessing.eval_image(x, PHOTO, jpeg=True), encoded, mode=mode)
    np.testing.assert_array_equal(branched.numpy(), direct.numpy())


@pytest.mark.parametrize("mode", MODES)
def test_paper_crop_of_a_large_image_is_resized_to_the_crop_size(mode):
    encoded = encode(smooth_image(480, 640, seed=2), "jpeg")
    crop = run(lambda x, s: preprocessing.paper_crop(x, s, PHOTO), encoded, [3, 4], mode=mode)
    assert crop.shape == (227, 227, 3)
    assert 0 <= float(tf.reduce_min(crop)) and float(tf.reduce_max(crop)) <= 255.5


@pytest.mark.parametrize("mode", MODES)
def test_inception_crop_shape_and_range(mode):
    config = PreprocessConfig(image_size=64, resize_size=73, crop="inception")
    encoded = encode(smooth_image(120, 90, seed=3), "jpeg")
    out = run(lambda x, s: preprocessing.inception_crop(x, s, config), encoded, [5, 6], mode=mode)
    assert out.shape == (64, 64, 3)
    assert 0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 255.5


@pytest.mark.parametrize("mode", MODES)
def test_pad_crop_is_a_window_of_the_padded_image(mode):
    config = PreprocessConfig(image_size=28, resize_size=28, channels=1, mean=(0,), std=(1,), crop="pad", pad=3)
    image = smooth_image(28, 28, seed=4, channels=1)
    padded = np.pad(image, [(3, 3), (3, 3), (0, 0)]).astype(np.float32)
    for seed in range(5):
        out = run(lambda x, s: preprocessing.pad_crop(x, s, config), image, [seed, 0], mode=mode)
        assert find_window(out.numpy(), padded) is not None


@pytest.mark.parametrize("mode", MODES)
def test_flip_gives_the_image_or_its_mirror(mode):
    image = smooth_image(8, 9, seed=5).astype(np.float32)
    seen = set()
    for seed in range(20):
        out = run(preprocessing.random_flip, image, [seed, 1], mode=mode).numpy()
        if np.array_equal(out, image):
            seen.add("same")
        elif np.array_equal(out, image[:, ::-1]):
            seen.add("mirror")
        else:
            pytest.fail("flip produced neither the image nor its mirror")
    assert seen == {"same", "mirror"}


@pytest.mark.parametrize("mode", MODES)
def test_pca_lighting_statistics_along_each_eigenvector(mode):
    # Many draws on a black image: the shift projected on eigenvector i is alpha_i * 255 * lambda_i,
    # so its mean is ~0 and its std ~0.1 * 255 * lambda_i (paper §4.1).
    config = PreprocessConfig(image_size=4, resize_size=4, crop="pad", pad=0, flip=False,
                              mean=(0, 0, 0))
    image = np.zeros((4, 4, 3), np.uint8)
    seeds = np.stack([np.arange(4000), np.zeros(4000, np.int64)], 1)
    if mode == "eager":
        shifts = np.stack([preprocessing.train_image(image, s, config)[0, 0].numpy() for s in seeds[:600]])
    else:
        ds = tf.data.Dataset.from_tensor_slices(seeds).map(
            lambda s: preprocessing.train_image(image, s, config)[0, 0])
        shifts = np.stack(list(ds.as_numpy_iterator()))
    eigvec = np.array(preprocessing.IMAGENET_EIGVEC)
    eigval = np.array(preprocessing.IMAGENET_EIGVAL) * 255
    projected = shifts @ eigvec  # columns are orthonormal eigenvectors
    n = len(shifts)
    np.testing.assert_allclose(projected.std(0), 0.1 * eigval, rtol=4 / np.sqrt(n) + 0.02)
    assert np.all(np.abs(projected.mean(0)) < 4 * 0.1 * eigval / np.sqrt(n))


def test_pca_lighting_shift_is_the_same_for_every_pixel():
    image = smooth_image(6, 7, seed=6).astype(np.float32)
    out = preprocessing.pca_lighting(image, [0.5, -1.0, 2.0], preprocessing.IMAGENET_EIGVAL,
                                     preprocessing.IMAGENET_EIGVEC).numpy()
    delta = out - image
    expected = np.array(preprocessing.IMAGENET_EIGVEC) @ (
        np.array([0.5, -1.0, 2.0]) * np.array(preprocessing.IMAGENET_EIGVAL) * 255)
    np.testing.assert_allclose(delta, np.broadcast_to(expected, delta.shape), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_eval_image_is_the_normalised_centre_crop(mode):
    image = smooth_image(256, 300, seed=7)
    out = run(lambda x: preprocessing.eval_image(x, PHOTO), image, mode=mode).numpy()
    top, left = (256 - 227) // 2, (300 - 227) // 2
    expected = image[top : top + 227, left : left + 227].astype(np.float32) - np.array(PHOTO.mean)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(256, 300), (300, 256), (480, 640), (227, 227), (100, 150)])
def test_eval_images_of_a_batch_is_eval_image_of_each(mode, shape):
    images = np.stack([smooth_image(*shape, seed=s) for s in (1, 2, 3)])
    batch = run(lambda x: preprocessing.eval_images(x, PHOTO), images, mode=mode).numpy()
    assert batch.shape == (3, 227, 227, 3)
    for image, out in zip(images, batch):
        np.testing.assert_array_equal(out, preprocessing.eval_image(image, PHOTO).numpy())
    if shape == (256, 300):  # and it is the centre crop, as numpy cuts it
        top, left = (256 - 227) // 2, (300 - 227) // 2
        expected = images[:, top : top + 227, left : left + 227] - np.float32(PHOTO.mean)
        np.testing.assert_allclose(batch, expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_eval_image_resizes_the_shorter_side(mode):
    out = run(lambda x: preprocessing.resize_shorter_side(x, 256), smooth_image(300, 600), mode=mode)
    assert out.shape == (256, 512, 3)


@pytest.mark.parametrize("mode", MODES)
def test_ten_crop_matches_numpy_slices(mode):
    image = smooth_image(256, 256, seed=8)
    out = run(lambda x: preprocessing.ten_crop(x, PHOTO), image, mode=mode).numpy()
    assert out.shape == (10, 227, 227, 3)
    x = image.astype(np.float32) - np.array(PHOTO.mean, np.float32)
    d = 256 - 227
    crops = [x[:227, :227], x[:227, d:], x[d:, :227], x[d:, d:], x[d // 2 : d // 2 + 227, d // 2 : d // 2 + 227]]
    expected = np.stack(crops + [c[:, ::-1] for c in crops])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_train_image_output_and_determinism(mode):
    encoded = encode(smooth_image(300, 400, seed=9), "jpeg")
    fn = lambda x, s: preprocessing.train_image(x, s, PHOTO)  # noqa: E731
    a = run(fn, encoded, [7, 8], mode=mode)
    b = run(fn, encoded, [7, 8], mode=mode)
    c = run(fn, encoded, [9, 8], mode=mode)
    assert a.shape == (227, 227, 3) and a.dtype == tf.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Mean-subtracted pixels lie within [-max(mean), 255 - min(mean)] widened by the lighting
    # shift, which is below 4 sigma = 4 * 0.1 * 0.2175 * 255 ~ 22 with overwhelming probability.
    assert float(tf.reduce_min(a)) > -123.68 - 22 and float(tf.reduce_max(a)) < 255 - 103.939 + 22


def test_looks_complete_rejects_truncated_empty_and_non_images():
    jpeg, png = encode(smooth_image(20, 20), "jpeg"), encode(smooth_image(20, 20), "png")
    cases = {jpeg: True, png: True, jpeg[: len(jpeg) // 2]: False, png[:-5]: False,
             b"": False, b"hello, not an image": False}
    for data, expected in cases.items():
        assert bool(image_bytes.looks_complete(tf.constant(data))) == expected


def test_pca_lighting_layer():
    layer = preprocessing_layers.PCALighting(seed=3)
    images = tf.zeros([4, 5, 5, 3])
    np.testing.assert_array_equal(layer(images, training=False), images)
    out = layer(images, training=True).numpy()
    per_image = out.reshape(4, -1, 3)
    assert np.allclose(per_image, per_image[:, :1])  # one shift per image
    assert not np.allclose(per_image[0, 0], per_image[1, 0])  # drawn per image
    restored = preprocessing_layers.PCALighting.from_config(layer.get_config())
    assert restored.eigval == layer.eigval and restored.alpha_std == 0.1


def test_compute_pca_recovers_a_known_covariance():
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    scales = np.array([0.12, 0.05, 0.02])  # small enough that clipping to [0, 1] is rare
    pixels = 0.5 + (rng.normal(size=(50_000, 3)) * scales) @ rotation.T
    images = [np.clip(pixels, 0, 1).reshape(100, 500, 3)[i * 10 : (i + 1) * 10] * 255 for i in range(10)]
    eigval, eigvec = pca.compute_pca(images)
    np.testing.assert_allclose(eigval, scales**2, rtol=0.05)
    for i in range(3):
        assert abs(abs(np.dot(np.array(eigvec)[:, i], rotation[:, i])) - 1) < 1e-2


def test_preprocess_config_json_round_trip(tmp_path):
    path = str(tmp_path / "p.json")
    PHOTO.to_json(path)
    assert PreprocessConfig.from_json(path) == PHOTO


@pytest.mark.parametrize("mode", MODES)
def test_eval_image_of_jpeg_bytes_matches_the_decoded_image(mode):
    # The pipeline passes bytes (decoding fused with the centre window), serving decoded images.
    image = smooth_image(300, 400, seed=9)
    encoded = tf.io.encode_jpeg(image, quality=95)
    from_bytes = run(lambda x: preprocessing.eval_image(x, PHOTO), encoded, mode=mode).numpy()
    decoded = image_bytes.decode(encoded, 3)
    from_pixels = preprocessing.eval_image(decoded, PHOTO).numpy()
    assert from_bytes.shape == (227, 227, 3)
    # The same pixels up to libjpeg's chroma upsampling at the window's edge.
    assert np.abs(from_bytes - from_pixels).mean() < 0.5
    # And the centre: a 300-pixel shorter side at 256 scale makes a 266-pixel window.
    side = round(300 * 227 / 256)
    top, left = (300 - side) // 2, (400 - side) // 2
    window = tf.cast(decoded[top : top + side, left : left + side], tf.float32)
    expected = tf.image.resize(window, [227, 227]).numpy() - np.array(PHOTO.mean)
    np.testing.assert_allclose(from_pixels, expected, atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_header_pixels_reads_the_declared_size_without_decoding(mode):
    from PIL import Image

    def pil(fmt, height, width, channels=3):
        buffer = io.BytesIO()
        Image.fromarray(smooth_image(height, width, channels=channels).squeeze()).save(
            buffer, format=fmt)
        return buffer.getvalue()

    cases = [
        (encode(smooth_image(37, 53), "jpeg"), 37 * 53),
        (pil("JPEG", 300, 470), 300 * 470),
        (pil("PNG", 300, 470), 300 * 470),
        (pil("PNG", 29, 31, channels=1), 29 * 31),
        (png_bomb(70000, 3), 70000 * 3),  # width beyond 16 bits
        (jpeg_bomb(20000, 20000), 400_000_000),
        (pil("GIF", 30, 40), -1),
        (pil("BMP", 30, 40), -1),
        (b"", -1),
        (b"\x89PN", -1),
    ]
    for encoded, pixels in cases:
        assert int(run(image_bytes.header_pixels, tf.constant(encoded), mode=mode)) == pixels
