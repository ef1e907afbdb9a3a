"""Peak memory of one `serving_default` request per image, with and without the pixel budget.

Exports an untrained paper-variant AlexNet twice (the default budget, 40 MP, and a budget of
10^9 pixels, i.e. none for these files), then serves each image in a fresh process
(tests/serve_files.py) and prints that process's peak resident memory (wait4's ru_maxrss) and
how the request ended. The images: a 300x240 JPEG, a 12-megapixel photograph (matplotlib's
sample photo resized to 4000x3000), a 0.4 MB PNG of 20000x20000 grey pixels and a JPEG whose
header declares 20000x20000.

    python benchmarks/serving_memory.py
"""

import dataclasses
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from alexnet_tf import flag_facts, model as model_lib, preprocessing, serving  # noqa: E402
from tests.helpers import (encode, jpeg_bomb, photo_jpeg, png_bomb, run_measured,  # noqa: E402
                           smooth_image)


def main():
    work = tempfile.mkdtemp(prefix="serving_memory_")
    images = {"300x240 JPEG": encode(smooth_image(300, 240), "jpeg"),
              "12 MP photo (JPEG)": photo_jpeg(3000, 4000),
              "PNG bomb 20000x20000": png_bomb(20000, 20000),
              "JPEG header 20000x20000": jpeg_bomb(20000, 20000)}
    paths = {}
    for i, (name, content) in enumerate(images.items()):
        paths[name] = os.path.join(work, f"image{i}")
        with open(paths[name], "wb") as f:
            f.write(content)
    model = model_lib.AlexNet(10, "paper", init="keras")
    preprocess = preprocessing.PreprocessConfig()
    print("| image | bytes | budget | peak MB | answer |\n|---|---|---|---|---|")
    for budget in (flag_facts.MAX_PIXELS, 10**9):
        export = serving.export_saved_model(
            model, os.path.join(work, f"budget{budget}"), [str(i) for i in range(10)],
            dataclasses.replace(preprocess, max_pixels=budget))
        for name, path in paths.items():
            status, _, stderr, peak = run_measured(
                [sys.executable, os.path.join(ROOT, "tests", "serve_files.py"), export, path],
                env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
            answer = "ok" if status == 0 else next(
                (line.strip() for line in stderr.splitlines() if "pixels" in line
                 or "Invalid" in line), f"exit {status}")[:90]
            print(f"| {name} | {len(images[name]):,} | {budget:,} | {peak:,.0f} | {answer} |",
                  flush=True)


if __name__ == "__main__":
    main()
