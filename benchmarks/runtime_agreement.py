"""How far each export format's float32 answers are from the SavedModel's, for both shipped
ImageNet variants: the figures behind the tolerances the tests hold them to.

    pip install -e '.[test]'   # the export extra's runtimes, and the tests' helpers
    python benchmarks/runtime_agreement.py

For each variant, a seeded model whose classifier is re-centred on the suite's photographs (so
that each has a clear answer, as in tests/test_formats.py and tests/test_runtimes.py) is
exported by `formats.export` in every float32 format; each file runs in its runtime on the
photographs' evaluation views. Prints, per variant and runtime, the largest absolute difference
in any probability from the SavedModel's `predict_images`, and whether every top-1 is the same.
LiteRT runs twice: with its builtin kernels alone, and as it runs by default (its XNNPACK
delegate on a CPU).
"""

import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from absl import app  # noqa: E402

from alexnet_tf import formats  # noqa: E402
from tests.helpers import decisive_photo_export  # noqa: E402
from tests.test_formats import PHOTO_VARIANTS, SHARPNESS, Runtime  # noqa: E402

RUNTIMES = [("LiteRT, builtin kernels", "litert", True), ("LiteRT, XNNPACK", "litert", False),
            ("ONNX Runtime", "onnx", True), ("OpenVINO, f32", "openvino", True)]


def agreement(variant, workdir):
    """[(runtime, largest difference, same top-1)] of one variant."""
    config = PHOTO_VARIANTS[variant]
    model, views, names, _, expected = decisive_photo_export(
        variant, config, SHARPNESS[variant], os.path.join(workdir, "saved_model"))
    versions = {}
    rows = []
    for label, fmt, reference in RUNTIMES:
        if fmt not in versions:
            versions[fmt] = formats.export(model, os.path.join(workdir, fmt), names, config, fmt)
        got = Runtime(versions[fmt], fmt, reference=reference).probabilities(views)
        rows.append((label, float(np.abs(got - expected).max()),
                     bool((got.argmax(-1) == expected.argmax(-1)).all())))
    return rows, len(views)


def main(argv):
    del argv
    print("| variant | runtime | largest difference from the SavedModel | same top-1 |")
    print("|---|---|---|---|")
    for variant in sorted(PHOTO_VARIANTS):
        with tempfile.TemporaryDirectory(prefix="alexnet_tf_agreement_") as workdir:
            rows, count = agreement(variant, workdir)
        for label, difference, same in rows:
            print(f"| {variant} | {label} | {difference:.1e} | "
                  f"{'yes' if same else 'NO'} ({count} photographs) |", flush=True)


if __name__ == "__main__":
    app.run(main)
