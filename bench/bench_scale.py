"""Issue 22 item 2: memory and time of everything that scales with classes x images, at iNat size, on CPU.

A generated competition with long-tailed (Zipf) labels, C classes and N test ids (no images: what
is measured starts where the probabilities reach host memory): each stage runs in its own process,
whose peak RSS (VmHWM) above its RSS with the inputs already in memory is the stage's own memory,
stated against the size of the probabilities it works on (N x C float32):

  write       write_predictions: decode, submission.csv (rendered, validated, written) and test_probs.npy
  thresholds  one threshold per class searched on V validation rows (multi-label), then applied
  reports     error analysis of the V validation rows (per label, worst images, confusions)
  blend       2 models x 3 fold runs (test_probs.npy N x C each + OOF rows): load, weights, blended probabilities

    .venv/bin/python bench/bench_scale.py                      # 1,010 x 100k and 15,000 x 10k -> results/scale.json
    .venv/bin/python bench/bench_scale.py --one write multiclass 1010 20000 2000   # one stage, prints its JSON
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MB = 2 ** 20
CHUNK_CELLS = 2 ** 22  # cells generated at a time (16 MB of float32): making the inputs stays small


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def long_tail(n: int, c: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) classes with Zipf-like frequencies (class k ~ 1/(k+1)), as iNat's."""
    p = 1.0 / np.arange(1, c + 1)
    return rng.choice(c, size=n, p=p / p.sum())


def probabilities(n: int, c: int, task: str, rng: np.random.Generator, truth: np.ndarray | None = None) -> np.ndarray:
    """(n, c) float32 rows: softmax-like (multiclass) or independent sigmoids (multilabel), the true
    class(es) pushed up so the decisions are not all noise."""
    out = np.empty((n, c), np.float32)
    chunk = max(1, CHUNK_CELLS // c)
    for s in range(0, n, chunk):
        block = rng.random((min(chunk, n - s), c), dtype=np.float32)
        # multiclass: a peaked softmax-like row; multilabel: most classes near 0, about 1% above 0.1
        block = block ** 8 if task == "multiclass" else 0.3 * block ** 40
        if truth is not None:
            rows = np.arange(len(block))
            if truth.ndim == 1:
                block[rows, truth[s:s + len(block)]] += 2.0
            else:
                block += truth[s:s + len(block)] * 0.7
        out[s:s + len(block)] = block / block.sum(1, keepdims=True) if task == "multiclass" else np.minimum(block, 1)
    return out


def competition(root: Path, task: str, c: int, n: int):
    from kernelkit.inputs.competition import Competition
    ids = [f"t{i:07d}" for i in range(n)]
    sample = root / "sample_submission.csv"
    sample.write_text("id,predicted\n" + "".join(f"{i},0\n" for i in ids))
    classes = [str(k) for k in range(c)]
    return Competition("single_label_csv" if task == "multiclass" else "multilabel_csv", task, classes,
                       [f"class {k}" for k in classes], [], np.zeros(0, np.int64), ids, [""] * n,
                       sample_submission=sample, submission_columns=["id", "predicted"])


def multilabel_truth(n: int, c: int, rng: np.random.Generator) -> np.ndarray:
    truth = np.zeros((n, c), np.uint8)
    for k in range(3):  # up to three long-tailed labels per image
        truth[np.arange(n), long_tail(n, c, rng)] = 1
    return truth


def stage_write(work: Path, task: str, c: int, n: int, v: int) -> tuple:
    from kernelkit.app.predictor import write_predictions
    from kernelkit.decide.thresholds import ThresholdRule
    rng = np.random.default_rng(0)
    comp = competition(work, task, c, n)
    probs = probabilities(n, c, task, rng)
    ok = np.ones(n, bool)
    rule = ThresholdRule("class", rng.uniform(0.1, 0.3, c).tolist()) if task == "multilabel" else ThresholdRule()

    def run():
        write_predictions(comp, probs, ok, task, rule, work)
        return {"submission_mb": round((work / "submission.csv").stat().st_size / MB, 1)}
    return probs, run


def stage_thresholds(work: Path, task: str, c: int, n: int, v: int) -> tuple:
    from kernelkit.decide.rules import RuleSettings, refine_rule
    rng = np.random.default_rng(1)
    truth = multilabel_truth(v, c, rng)
    probs = probabilities(v, c, "multilabel", rng, truth)
    settings = RuleSettings(kind="class")

    def run():
        rule = refine_rule(settings, 0.2, [str(k) for k in range(c)], truth, probs)
        rule.apply(probs)
        return {"rule": rule.kind}
    return probs, run


def stage_reports(work: Path, task: str, c: int, n: int, v: int) -> tuple:
    from kernelkit.decide.reports import write_error_analysis
    rng = np.random.default_rng(2)
    truth = long_tail(v, c, rng) if task == "multiclass" else multilabel_truth(v, c, rng)
    probs = probabilities(v, c, task, rng, truth)
    pred = probs.argmax(1) if task == "multiclass" else probs > 0.2

    def run():
        s = write_error_analysis(truth, pred, probs, [f"class {k}" for k in range(c)], [f"v{i}" for i in range(v)],
                                 work)
        return {"errors": int(s.get("errors", s.get("images_with_errors", 0)))}
    return probs, run


def stage_blend(work: Path, task: str, c: int, n: int, v: int) -> tuple:
    """Two models, each trained over 3 folds (3 run folders with test_probs.npy and their OOF rows)."""
    from kernelkit.core.fileio import write_npy
    from kernelkit.data.folds import save_oof
    from kernelkit.decide.ensemble import fit_weights, load_member, mix
    from kernelkit.decide.metrics import accuracy
    rng = np.random.default_rng(3)
    labels = long_tail(v, c, rng)
    folds = np.arange(v) % 3
    members = []
    for m in range(2):
        members.append([work / f"model{m}_fold{k}" for k in range(3)])
        for k, d in enumerate(members[-1]):
            rows = np.flatnonzero(folds == k)
            save_oof(d / "oof", k, rows, probabilities(len(rows), c, task, rng, labels[rows]))
            write_npy(d / "test_probs.npy", probabilities(n, c, task, rng))

    def score(p: np.ndarray) -> float:
        return accuracy(labels, p)

    def run():
        loaded = [load_member(dirs, v, c, n) for dirs in members]
        weights, _ = fit_weights([m.oof for m in loaded], score)
        blended = mix([m.test for m in loaded], weights)
        return {"weights": [round(float(w), 2) for w in weights], "blended": list(blended.shape)}
    return None, run


STAGES = {"write": stage_write, "thresholds": stage_thresholds, "reports": stage_reports, "blend": stage_blend}


def one(stage: str, task: str, c: int, n: int, v: int) -> dict:
    """Run one stage in this process -> its peak RSS above the inputs, time and sizes."""
    from kernelkit.app import predictor  # noqa: F401  (imports before the baseline: torch, pandas)
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        probs, run = STAGES[stage](Path(tmp), task, c, n, v)
        # Peak from here on only: VmHWM reset to the current RSS (Linux >= 4.0), so the stage is not
        # charged with what making its inputs took.
        Path("/proc/self/clear_refs").write_text("5")
        base = rss_mb("VmRSS")
        t0 = time.perf_counter()
        extra = run()
        seconds = time.perf_counter() - t0
        peak = rss_mb("VmHWM")
    rows = n if stage in ("write", "blend") else v
    # blend: one model's test probabilities and its OOF rows (the weights are fitted on the OOF rows)
    cells = (n + v) * c if stage == "blend" else rows * c
    return {"stage": stage, "task": task, "classes": c, "rows": rows, "probs_mb": round(cells * 4 / MB, 1),
            "seconds": round(seconds, 2), "peak_above_inputs_mb": round(max(peak - base, 0.0), 1),
            "peak_rss_mb": round(peak, 1), **extra}


def measure(stage: str, task: str, c: int, n: int, v: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--one", stage, task, str(c), str(n), str(v)],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{stage} {task} {c}x{n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


SCALES = [  # (classes, test ids, validation rows)
    (1010, 100_000, 10_000),  # iNat 2019 size
    (15_000, 10_000, 5_000),  # the memory paths with a huge label set
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", nargs=5, metavar=("STAGE", "TASK", "C", "N", "V"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], a.one[1], *map(int, a.one[2:]))))
        return
    rows = []
    for c, n, v in SCALES:
        for stage, task in (("write", "multiclass"), ("write", "multilabel"), ("thresholds", "multilabel"),
                            ("reports", "multiclass"), ("reports", "multilabel"), ("blend", "multiclass")):
            r = measure(stage, task, c, n, v)
            print(json.dumps(r), flush=True)
            rows.append(r)
    Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
