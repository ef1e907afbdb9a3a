"""Make the paper's 256 x 256 data once, for fast training: python prepare.py --dataset=SOURCE
--output_dir=DIR, then train with --dataset=prepared:DIR.

    python prepare.py --dataset=folder:photos --output_dir=data/photos-256

writes TFRecord shards of 256 x 256 JPEGs and dataset.json (classes, counts, skipped files, PCA
eigen-pairs of the training pixels). Rerunning the same command resumes: finished shards are
kept. The work is in alexnet_tf.prepare.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from alexnet_tf import cli, flag_facts, prepare, sources  # noqa: E402

flags.DEFINE_string("dataset", None, "A photo source as train.py takes it: folder:<path>, "
                    "tfds:<name> or tfrecord:<glob>.", required=True)
flags.DEFINE_string("output_dir", None, "Where the shards and dataset.json go.", required=True)
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
flags.DEFINE_integer("quality", prepare.DEFAULT_QUALITY, "JPEG quality of the prepared images "
                     "(BENCHMARKS.md measures size and PSNR by quality).", lower_bound=1,
                     upper_bound=100)
flags.DEFINE_bool("keep_frame", False, "Keep the whole frame (shorter side 256) instead of the "
                  "paper's central 256 x 256 square.")
flags.DEFINE_integer("records_per_shard", prepare.RECORDS_PER_SHARD, "Records per TFRecord shard.",
                     lower_bound=1)
flags.DEFINE_integer("max_pixels", flag_facts.MAX_PIXELS, "Source images whose header declares "
                     "more pixels are skipped (and listed in dataset.json).", lower_bound=1)
flags.DEFINE_integer("num_classes", None, "Classes of a tfrecord: source.")
flags.DEFINE_bool("one_based_labels", False, "A tfrecord: source's labels start at 1.")
flags.DEFINE_list("splits", list(prepare.SPLITS), "Splits to prepare.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        prepare.prepare(FLAGS.dataset, FLAGS.output_dir, data_dir=FLAGS.data_dir,
                        quality=FLAGS.quality, keep_frame=FLAGS.keep_frame,
                        records_per_shard=FLAGS.records_per_shard, max_pixels=FLAGS.max_pixels,
                        num_classes=FLAGS.num_classes, one_based_labels=FLAGS.one_based_labels,
                        splits=FLAGS.splits)
    except (prepare.PrepareError, sources.DataError, OSError, *cli.file_errors()) as e:
        cli.exit_with_error("prepare.py", e)
    print(f"prepared {FLAGS.output_dir}; train with --dataset=prepared:{FLAGS.output_dir}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("prepare.py"))
