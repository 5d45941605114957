"""Issue 22 item 2, reduced: what scales with classes x images stays inside its stated memory bound.

bench/bench_scale.py at 1,010 classes x 20,000 test ids (2,000 validation rows), long-tailed labels,
each stage in its own process: its peak RSS above its inputs is bounded by a multiple of the size
of the probabilities it works on (the bounds the README states), never an absolute time.
"""
import json
import subprocess
import sys

import pytest
from conftest import ROOT

CLASSES, TEST_IDS, VAL_ROWS = 1010, 20_000, 2_000
SLACK_MB = 64  # interpreter, pandas and CSV text of this size: not proportional to classes x images
# stage -> peak above the inputs, in units of the probabilities' float32 size
BOUNDS = {("write", "multiclass"): 0.5, ("write", "multilabel"): 0.5, ("blend", "multiclass"): 3.5,
          ("thresholds", "multilabel"): 6.0, ("reports", "multiclass"): 2.0, ("reports", "multilabel"): 1.5}


@pytest.mark.parametrize("stage,task", list(BOUNDS))
def test_stage_memory_is_bounded_by_the_data(stage, task):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_scale.py"), "--one", stage, task,
                           str(CLASSES), str(TEST_IDS), str(VAL_ROWS)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["rows"] == (TEST_IDS if stage in ("write", "blend") else VAL_ROWS)
    bound = BOUNDS[stage, task] * r["probs_mb"] + SLACK_MB
    assert r["peak_above_inputs_mb"] <= bound, r
