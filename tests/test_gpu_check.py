"""benchmarks/gpu.py, the check a lent GPU runs, kept runnable: every part at tiny sizes here."""

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_every_part_of_the_gpu_check_runs_on_a_cpu():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--smoke"],
                            capture_output=True, text=True, timeout=1200,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| part")]
    parts = {}
    for part, case, rate, ms, memory, note in (map(str.strip, row) for row in rows):
        parts.setdefault(part, []).append((case, rate, ms, note))
        assert not note.startswith(("FAILED", "STOPPED")), (part, case, note)
    assert set(parts) == {"train", "torch", "input", "run", "serve"}
    # Each precision trained under XLA (LRN in float16 too), at train.py's batch as well.
    cases = {case for case, *_ in parts["train"]}
    assert {"paper b2 float32 XLA", "paper b2 float16 XLA", "paper b2 bfloat16 XLA",
            "paper b2 bfloat16 XLA fit"} <= cases
    timed = [(rate, ms) for rows_ in parts.values() for _, rate, ms, _ in rows_ if rate != "-"]
    assert len(timed) >= 8 and all(float(r.replace(",", "")) > 0 and float(m) > 0
                                   for r, m in timed)
    # train.py on one device and through MirroredStrategy with XLA over two replicas.
    runs = [case for case, rate, _, _ in parts["run"] if rate != "-"]
    assert len(runs) == 2 and any("MirroredStrategy over 2 logical" in case for case in runs)
    assert [case for case, _, _, note in parts["run"] if note == "exported"] == ["export.py"]
    serve = [note for case, _, _, note in parts["serve"]]
    assert len(serve) == 2 and all(re.fullmatch(r"p99 [\d.]+ ms over 3 requests", n) for n in serve)
    # The parts' budgets fit in six minutes.
    budget = re.search(r"budgets .* = (\d+) s", result.stdout)
    assert budget and int(budget.group(1)) <= 360, result.stdout[-500:]
