"""What a run reads: its one Source, the checks of its splits, and the PreprocessConfig that one
function (`preprocess_config`) decides and the run keeps."""

import dataclasses
import json
import os

from absl import logging

from alexnet_tf import data, flag_facts, pca, preprocessing, scans, sources, weights
from alexnet_tf.train_config import TrainConfig, TrainingError

PCA_SAMPLE = 1000  # training images whose pixels give --pca=dataset's eigen-pairs


def preprocess_config(info, config=None, source=None, saved=None):
    """The PreprocessConfig of a run, decided here and nowhere else.

    Args:
        info: the training split's `sources.DatasetInfo`: its channels, its images' own size,
            its pixel statistics and whether they may be flipped decide small images' cuts.
        config: the run's `TrainConfig`: the variant (the crop size), --image_size, --crop,
            --pad, --pca, --max_pixels, and --init_from (the weights' input convention);
            default: the paper's recipe.
        source: the `sources.Source` whose training images --pca=dataset samples.
        saved: the run's preprocessing.json; when it exists (a resumed run) it is kept as is.
    """
    if saved is not None and os.path.exists(saved):
        return preprocessing.PreprocessConfig.from_json(saved)
    config = config or TrainConfig()
    pre = _small_images(info, config) if info.small_images else _photos(info, config)
    changes = {"max_pixels": config.max_pixels}
    convention = config.init_from and weights.preprocess_config_for(config.init_from)
    if convention is not None and pre.channels == 3:
        logging.info("%s expects %s input with mean %s and std %s", config.init_from,
                     "BGR" if convention.bgr else "RGB", convention.mean, convention.std)
        changes.update(mean=convention.mean, std=convention.std, bgr=convention.bgr)
    if config.pca == "none":
        changes.update(eigval=None, eigvec=None)
    elif config.pca == "dataset" and info.prepared is not None and "pca" in info.prepared:
        counted = info.prepared["pca"]
        logging.info("PCA lighting eigen-pairs of the %s training pixels prepare.py counted",
                     f"{counted['pixels']:,}")
        changes["eigval"] = tuple(counted["eigval"])
        changes["eigvec"] = tuple(tuple(row) for row in counted["eigvec"])
    elif config.pca == "dataset" and pre.channels == 3:
        images, skips = scans.decoded_sample(source, PCA_SAMPLE, config.max_pixels)
        logging.info("PCA lighting eigen-pairs from %d training images (skipped: %s)",
                     len(images), skips.describe())
        changes["eigval"], changes["eigvec"] = pca.compute_pca(images)
    return dataclasses.replace(pre, **changes)


def _small_images(info, config):
    """Same-size small images (MNIST, CIFAR): padded and cropped at their own size, normalised
    by their own statistics where the source has them."""
    size = config.image_size or info.image_size[0]
    mean, std = info.mean_std or (127.5, 127.5)
    return preprocessing.PreprocessConfig(
        image_size=size, resize_size=size, channels=info.channels,
        mean=(mean,) * info.channels, std=(std,) * info.channels,
        crop="pad", pad=size // 8 if config.pad is None else config.pad, flip=info.flippable)


def _photos(info, config):
    """Photos: the paper's cuts at the variant's size, ImageNet's mean subtracted."""
    size = config.image_size or flag_facts.DEFAULT_IMAGE_SIZE[config.variant]
    resize_size = preprocessing.resize_size_for(size)
    if info.prepared is not None:
        # Crops are cut at the stored scale: the shorter side is already the resize_size.
        resize_size = info.prepared["resolution"]
        if size > resize_size:
            raise sources.DataError(f"{info.source}: {size}-pixel crops do not fit its "
                                    f"{resize_size}-pixel images")
    channels = info.channels
    mean = (preprocessing.IMAGENET_MEAN if channels == 3
            else (sum(preprocessing.IMAGENET_MEAN) / 3,))
    return preprocessing.PreprocessConfig(
        image_size=size, resize_size=resize_size, channels=channels, mean=mean,
        std=(1.0,) * channels, crop=config.crop)


def source_of(config):
    """The run's one Source: --dataset, read with the settings of `config` (a TrainConfig) that
    say how."""
    return sources.Source(config.dataset, data_dir=config.data_dir,
                          num_classes=config.num_classes,
                          one_based_labels=config.one_based_labels)


def check_splits(config, source):
    """data.DataError before anything is trained when a split cannot give what the run asks of
    it: one global batch of readable training images, and the validation images of
    --eval_steps batches (at least one)."""
    scans.check_split(source, "train", config.batch_size,
                      f"one training batch (--batch_size={config.batch_size})",
                      config.max_pixels, smaller="a smaller --batch_size")
    if config.eval_steps:
        needed = (config.eval_steps - 1) * config.batch_size + 1
        what = f"--eval_steps={config.eval_steps} at --batch_size={config.batch_size}"
        smaller = "a smaller --eval_steps" if config.eval_steps > 1 else None
    else:
        needed, what, smaller = 1, "validation", None
    scans.check_split(source, "validation", needed, what, config.max_pixels, smaller)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a run reads: its Source (each split listed once), the training split's
    description, its classes and the PreprocessConfig, fixed for the whole run (and saved with
    it)."""

    config: TrainConfig
    source: sources.Source
    num_classes: int
    class_names: list
    preprocess: preprocessing.PreprocessConfig

    @property
    def info(self):
        """The training split's DatasetInfo (listed once, by the Source)."""
        return self.source.info("train")

    def dataset(self, split, training, ten_crop=False, service=True, device=None,
                batches=None):
        """(dataset, skipped-image counter) of a split: a plain dataset of global batches of
        uint8 crops, which the model's steps pass through the InputStage first
        (`preprocessing_layers.run_input_stage`). Keras splits it across the replicas and, with
        several workers, shards it (by file where it can, else by record); Keras 3's fit() cannot take
        distribute_datasets_from_function's PerReplica. With --data_service a training pipeline
        runs on its workers, unless `service` is False (one batch for the image grid: a service
        job would make the workers start on a whole epoch). `device`: where each batch is
        copied ahead of its step (`devices.input_device`); `batches`: at most this many."""
        config = self.config
        options = data.Options(
            seed=config.seed, cache=config.cache, shuffle_buffer=config.shuffle_buffer,
            repeat=training, ten_crop=ten_crop,
            data_service=config.data_service if training and service else None,
            device=device, batches=batches)
        return data.make_dataset(self.source, split, training, config.batch_size,
                                 self.preprocess, options)


def prepare_inputs(config, run, source=None):
    """Settles the run's preprocessing from its source's description and records both (and the
    config) in the run directory. `source`: the run's Source (default: a new one of
    --dataset)."""
    source = source or source_of(config)
    info = source.info("train")
    num_classes = config.num_classes or info.num_classes
    pre = preprocess_config(info, config, source, saved=run.preprocessing)
    least = flag_facts.MIN_IMAGE_SIZE[config.variant]
    if pre.image_size < least:
        raise TrainingError(
            f"image_size {pre.image_size} is too small for variant {config.variant!r} "
            f"(at least {least})")
    class_names = sources.class_names_for(info.class_names, num_classes)
    pre.to_json(run.preprocessing)
    config.to_json(run.config)
    with open(run.dataset_file, "w") as f:
        json.dump({"source": config.dataset, "class_names": class_names}, f, indent=2)
    return Inputs(config, source, num_classes, class_names, pre)
