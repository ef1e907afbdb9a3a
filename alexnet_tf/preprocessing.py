"""Image preprocessing of paper §4.1: the PreprocessConfig that parametrises it, training crops,
flips and PCA lighting; eval and 10-crop. (Encoded bytes and prepared JPEGs' windows:
image_bytes; the Keras layers: preprocessing_layers; eigen-pairs of a user's data: pca.)

The ops take one image (or its encoded bytes), except those that take a batch [B, H, W, C]: the
`*_batch` ops and `eval_images` (`normalize`, `denormalize` and `to_uint8` take either). All
work both eagerly and inside `tf.data` maps. Images are float32 in [0, 255] until `normalize`.
The evaluation functions here are the ones the exported serving signatures call, so training and
serving cannot drift apart.
"""

import dataclasses
import json

import tensorflow as tf

from alexnet_tf.flag_facts import CROP_SCHEMES, MAX_PIXELS
from alexnet_tf.image_bytes import decode, is_encoded

# Per-channel statistics in [0, 255] that models are trained with; every one of them lives here.
# ImageNet's RGB mean as VGG's Caffe models subtract it (BGR 103.939, 116.779, 123.68): this
# project's mean for photos (with std 1, as the paper subtracts the mean only).
IMAGENET_MEAN = (123.68, 116.779, 103.939)
# BVLC Caffe's classification example: ilsvrc_2012_mean.npy per channel, in BGR order.
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
# torchvision's Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]), times 255.
TORCHVISION_MEAN = (123.675, 116.28, 103.53)
TORCHVISION_STD = (58.395, 57.12, 57.375)
# Training-set pixel mean and standard deviation of the grey digit and clothing datasets.
FASHION_MNIST_MEAN_STD = (72.94, 90.02)
MNIST_MEAN_STD = (33.32, 78.57)
# PCA of ImageNet RGB pixels in [0, 1], as used by fb.resnet.torch (transforms.lua, Lighting).
# Columns of IMAGENET_EIGVEC are the eigenvectors.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
PCA_ALPHA_STD = 0.1  # paper §4.1: "Gaussian with mean zero and standard deviation 0.1"


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Everything that turns stored images into model inputs; saved with each run as JSON.
    Frozen: a variation is `dataclasses.replace(preprocess, ...)`, which checks it again.

    Attributes:
        image_size: side of the square crop fed to the model (paper: 227 for conv1's 55x55).
        resize_size: shorter side before cropping (paper §2: 256). Equal to image_size for small
            images, which are then only padded and cropped.
        channels: 3 (RGB) or 1 (grey).
        mean, std: per-channel statistics in [0, 255], in the model's channel order; the paper
            subtracts the mean only (std 1).
        bgr: feed the model BGR instead of RGB (BVLC Caffe weights were trained on BGR).
        crop: "paper" (random image_size window of the central resize_size square), "inception"
            (random area 8-100%, aspect 3/4-4/3) or "pad" (pad by `pad` pixels, random crop).
        pad: padding of the "pad" scheme.
        flip: random horizontal flips (off for digits).
        eigval, eigvec: PCA lighting eigen-pairs for pixels in [0, 1]; None disables it.
        pca_alpha_std: standard deviation of the lighting coefficients.
        max_pixels: encoded images declaring more pixels are not decoded (see MAX_PIXELS).
    """

    image_size: int = 227
    resize_size: int = 256
    channels: int = 3
    mean: tuple = IMAGENET_MEAN
    std: tuple = (1.0, 1.0, 1.0)
    crop: str = "paper"
    pad: int = 4
    flip: bool = True
    eigval: tuple | None = IMAGENET_EIGVAL
    eigvec: tuple | None = IMAGENET_EIGVEC
    pca_alpha_std: float = PCA_ALPHA_STD
    bgr: bool = False
    max_pixels: int = MAX_PIXELS

    def __post_init__(self):
        if self.crop not in CROP_SCHEMES:
            raise ValueError(f"unknown crop scheme {self.crop!r}; choose one of {CROP_SCHEMES}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values")
        if self.channels != 3:
            # PCA lighting is defined on RGB only.
            object.__setattr__(self, "eigval", None)
            object.__setattr__(self, "eigvec", None)

    def to_json(self, path):
        with tf.io.gfile.GFile(path, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2)

    @classmethod
    def from_json(cls, path):
        with tf.io.gfile.GFile(path) as f:
            fields = json.load(f)
        for key in ("mean", "std", "eigval", "eigvec"):
            if fields.get(key) is not None:
                fields[key] = tuple(tuple(v) if isinstance(v, list) else v for v in fields[key])
        return cls(**fields)


# --------------------------------------------------------------------------------------------
# Resizing


def resize_size_for(image_size):
    """The shorter side a photo is resized to before an image_size crop: 256 for the paper's 224
    and Caffe's 227 (paper §2: images down-sampled to 256 x 256), in proportion for other sizes."""
    return 256 if image_size in (224, 227) else round(image_size * 256 / 227)


def _window_resized(image, window_fn, preprocess, jpeg=False):
    """Cuts the window `window_fn(shape)` = (top, left, height, width) out of an image and
    resizes it to image_size (bilinear, as Caffe and torchvision resize; antialiasing costs more
    than the JPEG decode).

    JPEG bytes: the header gives the shape and only the window is decoded
    (`decode_and_crop_jpeg`). Other bytes (PNG): full decode, then a slice. Decoded images: a
    slice. One branch per image: each `tf.cond` in a tf.data map costs about as much as the
    resize (BENCHMARKS.md, input pipeline). `jpeg=True` (bytes known to be JPEG): no branch.
    """
    image = tf.convert_to_tensor(image)

    def resized(window):
        # float32 in: the values of a uint8 window's, cheaper (the kernel converts each tap).
        return tf.image.resize(tf.cast(window, tf.float32), [preprocess.image_size] * 2)

    def from_pixels(pixels):
        top, left, height, width = window_fn(tf.shape(pixels)[:2])
        return resized(pixels[top : top + height, left : left + width])

    if not is_encoded(image):
        return from_pixels(image)

    def jpeg_window():
        top, left, height, width = window_fn(tf.io.extract_jpeg_shape(image)[:2])
        return resized(tf.image.decode_and_crop_jpeg(
            image, tf.stack([top, left, height, width]), channels=preprocess.channels))

    if jpeg:
        return jpeg_window()
    return tf.cond(tf.io.is_jpeg(image), jpeg_window,
                   lambda: from_pixels(decode(image, preprocess.channels)))


def _resize(image, height, width):
    size = tf.stack([height, width])
    same = tf.reduce_all(tf.equal(tf.shape(image)[:2], size))
    # Plain bilinear, as Caffe and torchvision resize.
    return tf.cond(same, lambda: image, lambda: tf.image.resize(image, size))


# --------------------------------------------------------------------------------------------
# Training ops


def _crop_side(short, preprocess):
    """Side, in original pixels, of the window that becomes an image_size crop once the shorter
    side `short` is scaled to resize_size."""
    side = tf.round(tf.cast(short, tf.float32) * preprocess.image_size / preprocess.resize_size)
    return tf.clip_by_value(tf.cast(side, tf.int32), 1, short)


def paper_window(shape, seed, preprocess):
    """The window (top, left, height, width), in original pixels, of `paper_crop` for an image of
    `shape` [height, width]."""
    short = tf.minimum(shape[0], shape[1])
    side = _crop_side(short, preprocess)
    offsets = tf.random.stateless_uniform([2], seed, 0, short - side + 1, dtype=tf.int32)
    square_h, square_w = (shape[0] - short) // 2, (shape[1] - short) // 2
    return square_h + offsets[0], square_w + offsets[1], side, side


def paper_crop(image, seed, preprocess, jpeg=False):
    """Paper §2/§4.1: a random image_size window of the central square, at resize_size scale.

    The window is chosen in original pixel coordinates, decoded alone (JPEG) and resized, which
    equals resizing the shorter side to resize_size first and cropping after, up to resampling.
    """
    window = lambda shape: paper_window(shape, seed, preprocess)  # noqa: E731
    return _window_resized(image, window, preprocess, jpeg)


def inception_crop(image, seed, preprocess, jpeg=False):
    """Inception-style random-resized crop: 8-100% of the area, aspect ratio 3/4-4/3."""
    def window(shape):
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.concat([shape, [preprocess.channels]], 0),
            bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
            seed=seed,
            min_object_covered=0.0,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        return begin[0], begin[1], size[0], size[1]

    return _window_resized(image, window, preprocess, jpeg)


def pad_crop(image, seed, preprocess, jpeg=False):
    """Small images: resize to image_size if needed, zero-pad by `pad`, random image_size crop."""
    del jpeg  # decoded whole either way
    image = tf.convert_to_tensor(image)
    if is_encoded(image):
        image = decode(image, preprocess.channels)
    return pad_crop_batch(image[None], seed, preprocess)[0]


def pad_crop_batch(images, seed, preprocess):
    """`pad_crop` of a batch [B, H, W, C] of same-size images, one random window per image.

    Vectorised (two batched gathers) because per-image map calls dominate the cost of
    augmenting 28x28 images on a 2-core machine.
    """
    images = tf.cast(images, tf.float32)
    p, size = preprocess.pad, preprocess.image_size
    if images.shape[1] != size or images.shape[2] != size:
        images = tf.image.resize(images, [size, size], antialias=True)
    padded = tf.pad(images, [[0, 0], [p, p], [p, p], [0, 0]])
    offsets = tf.random.stateless_uniform([tf.shape(images)[0], 2], seed, 0, 2 * p + 1, tf.int32)
    window = tf.range(size)
    rows = offsets[:, :1] + window  # [B, size]
    cols = offsets[:, 1:] + window
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(cropped, cols, axis=2, batch_dims=1)


def random_flip_batch(images, seed):
    """Each image of a batch or its left-right mirror, with probability 1/2 each."""
    flip = tf.random.stateless_uniform([tf.shape(images)[0], 1, 1, 1], seed) < 0.5
    return tf.where(flip, tf.reverse(images, axis=[2]), images)


def random_flip(image, seed):
    """The image or its left-right mirror, with probability 1/2 each."""
    return random_flip_batch(tf.convert_to_tensor(image)[None], seed)[0]


def pca_lighting(image, alpha, eigval, eigvec, pixel_scale=255.0):
    """Paper §4.1: adds eigvec @ (alpha * eigval) to every RGB pixel.

    Args:
        image: float [..., H, W, 3] in [0, pixel_scale].
        alpha: [..., 3] coefficients, one draw per image (~ N(0, 0.1)).
        eigval, eigvec: eigen-pairs of the RGB covariance for pixels in [0, 1] (columns of eigvec).
        pixel_scale: the pixel range the eigenvalues are scaled to.
    """
    eigval = tf.constant(eigval, tf.float32) * pixel_scale
    eigvec = tf.constant(eigvec, tf.float32)
    shift = tf.linalg.matvec(eigvec, tf.cast(alpha, tf.float32) * eigval)
    return image + shift[..., None, None, :]


def normalize(image, preprocess):
    """Per-channel mean subtraction (paper §2), optional std division, RGB -> BGR if asked."""
    image = tf.cast(image, tf.float32)
    if preprocess.bgr:
        image = tf.reverse(image, axis=[-1])
    std, mean = (tf.constant(v, tf.float32) for v in (preprocess.std, preprocess.mean))
    return (image - mean) / std


def denormalize(images, preprocess):
    """Inverse of `normalize`: model inputs back to RGB in [0, 255] (for looking at them)."""
    std, mean = (tf.constant(v, tf.float32) for v in (preprocess.std, preprocess.mean))
    images = images * std + mean
    return tf.reverse(images, axis=[-1]) if preprocess.bgr else images


def random_crop(image, seed, preprocess, jpeg=False):
    """The training crop of one image by `preprocess.crop`: "paper", "inception" or "pad".

    `jpeg=True` promises JPEG bytes (no format branch; other bytes fail to decode)."""
    crop = dict(zip(CROP_SCHEMES, (paper_crop, inception_crop, pad_crop)))[preprocess.crop]
    image = crop(tf.convert_to_tensor(image), seed, preprocess, jpeg=jpeg)
    return tf.ensure_shape(image, [preprocess.image_size] * 2 + [preprocess.channels])


def augment_batch(images, seed, preprocess):
    """Flip, PCA lighting and normalisation of a batch of crops [B, H, W, C] in [0, 255].

    Done on whole batches: per-image calls of these cheap ops cost more than the JPEG decode.
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
    images = tf.cast(images, tf.float32)
    if preprocess.flip:
        images = random_flip_batch(images, seeds[0])
    if preprocess.eigval is not None:
        alpha = tf.random.stateless_normal(
            [tf.shape(images)[0], 3], seeds[1], stddev=preprocess.pca_alpha_std)
        images = pca_lighting(images, alpha, preprocess.eigval, preprocess.eigvec)
    return normalize(images, preprocess)


def train_image(image, seed, preprocess):
    """Full training augmentation of one image: crop, flip, PCA lighting, normalisation.

    Args:
        image: encoded bytes (scalar string) or a decoded [H, W, C] image in [0, 255].
        seed: int32/int64 [2] stateless seed; the same seed gives the same augmentation.
        preprocess: a `PreprocessConfig`.
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
    image = random_crop(image, seeds[0], preprocess)
    return augment_batch(image[None], seeds[1], preprocess)[0]


# --------------------------------------------------------------------------------------------
# Evaluation ops (also used by the serving signatures)


def resize_shorter_side(image, size):
    """Resizes so that the shorter side is `size`, keeping the aspect ratio."""
    image = tf.convert_to_tensor(image)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.cast(size, tf.float32) / tf.reduce_min(shape)
    new = tf.cast(tf.round(shape * scale), tf.int32)
    return _resize(tf.cast(image, tf.float32), new[0], new[1])


def center_crop(image, size):
    """The central size x size window."""
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
    return image[top : top + size, left : left + size]


def _centre_window(shape, preprocess):
    """The window (top, left, height, width), in original pixels, of the evaluation view of an
    image of `shape` [height, width]: the centre of the square that becomes image_size once the
    shorter side is resize_size."""
    side = _crop_side(tf.minimum(shape[0], shape[1]), preprocess)
    return (shape[0] - side) // 2, (shape[1] - side) // 2, side, side


def eval_crop(image, preprocess, jpeg=False):
    """`eval_image` before normalisation: the centre view in [0, 255], float32.

    Computed as the central window of the original that becomes the centre crop (decoded alone
    for JPEG bytes), resized to image_size: equal to resizing first and cropping after, up to
    resampling, and cheaper (the full-size decode and resize are skipped).
    """
    window = lambda shape: _centre_window(shape, preprocess)  # noqa: E731
    image = _window_resized(image, window, preprocess, jpeg)
    return tf.ensure_shape(image, [preprocess.image_size] * 2 + [preprocess.channels])


def eval_image(image, preprocess, jpeg=False):
    """Evaluation view of one image: shorter side to resize_size, centre crop, normalise.

    Args:
        image: encoded JPEG/PNG bytes (scalar string), or [H, W, C] uint8 or float in [0, 255].
        preprocess: a `PreprocessConfig`.
        jpeg: the bytes are known to be JPEG (skips the format branch).
    """
    return normalize(eval_crop(image, preprocess, jpeg), preprocess)


def eval_images(images, preprocess):
    """`eval_image` of every image of a batch of decoded images of one shape, [N, H, W, C] uint8
    or float in [0, 255], at once: one slice and one resize of the batch, no per-image loop."""
    images = tf.convert_to_tensor(images)
    top, left, height, width = _centre_window(tf.shape(images)[1:3], preprocess)
    window = tf.cast(images[:, top : top + height, left : left + width], tf.float32)
    resized = tf.image.resize(window, [preprocess.image_size] * 2)
    shape = [None] + [preprocess.image_size] * 2 + [preprocess.channels]
    return normalize(tf.ensure_shape(resized, shape), preprocess)


def ten_crop_views(image, preprocess):
    """`ten_crop` before normalisation: float32 in [0, 255]. A decoded image whose shorter side
    is already resize_size (prepared data) is not resampled: the views are slices of it."""
    square = center_crop(resize_shorter_side(image, preprocess.resize_size), preprocess.resize_size)
    s, c = preprocess.resize_size, preprocess.image_size
    offsets = [(0, 0), (0, s - c), (s - c, 0), (s - c, s - c), ((s - c) // 2, (s - c) // 2)]
    crops = tf.stack([square[t : t + c, l : l + c] for t, l in offsets])
    crops = tf.concat([crops, tf.reverse(crops, axis=[2])], axis=0)
    return tf.ensure_shape(crops, [10, c, c, preprocess.channels])


def ten_crop(image, preprocess):
    """Paper §4.1 test-time views: four corners and centre of the central square, and mirrors.

    Returns:
        [10, image_size, image_size, C]: crops 0-4 are top-left, top-right, bottom-left,
        bottom-right and centre; crops 5-9 are their horizontal mirrors in the same order.
    """
    return normalize(ten_crop_views(image, preprocess), preprocess)


def to_uint8(images):
    """Float images in [0, 255] rounded to uint8 (values outside are clipped)."""
    return tf.saturate_cast(tf.round(images), tf.uint8)


