"""Does end-of-schedule weight averaging (swa) or blending K-fold runs help on the demo competition?

Runs kernel.py (the built artifact, copied to a temp dir) on one generated demo competition:

* swa: the demo preset with the same budget and epochs, `swa=0` against `swa=S`, for each seed:
  validation F2 (of what predicts), the demo test F2 against the generated answers, the average's
  own score.
* blend: two models (the demo's resnet18 at 64 px, and at 48 px) trained over K folds, then
  `--mode blend` on each model's K folders and on all 2K: CV F2 per fold, per model (out-of-fold)
  and blended, and the demo test F2 of every fold model's submission and of the blends'.

Fixed epochs (and a budget they fit in), so that a machine shared with other work changes how long
the benchmark takes, not what it measures.

    .venv/bin/python bench/bench_ensemble.py [--swa 0.25] [--seeds 42 7] [--epochs 6] [--fold-epochs 3]
                                             [--folds 3] [--demo-images 600] [--skip-swa] [--skip-blend]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def kernel(work: Path, out: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "kernel.py", "--out-dir", str(out), *args], cwd=work, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"kernel.py {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def demo_test_f2(data_dir: Path, out: Path) -> float:
    from kernelkit.app.demo import score_demo_submission
    from kernelkit.inputs.competition import load_competition
    return round(float(score_demo_submission(data_dir, out, load_competition(data_dir))), 4)


def bench_swa(work: Path, data: Path, args: argparse.Namespace) -> list[dict]:
    rows = []
    for seed in args.seeds:
        for swa in (0.0, args.swa):
            out = work / f"swa{swa}_seed{seed}"
            s = kernel(work, out, "--preset", "demo", "--data-dir", str(data), "--budget", "40m",
                       "--epochs", str(args.epochs), "--seed", str(seed), "--swa", str(swa))
            rows.append({"seed": seed, "swa": swa, "val_f2": round(s["val_score"], 4), "demo_test_f2":
                         demo_test_f2(data, out), "wall_s": s["wall_s"], "epochs": s["epochs"], "average": s.get("swa")})
            print(json.dumps(rows[-1]), flush=True)
    return rows


MODELS = {"r18_64px": ["--img-size", "64"], "r18_48px": ["--img-size", "48"]}


def bench_blend(work: Path, data: Path, args: argparse.Namespace) -> dict:
    runs, fold_tests = work / "runs", {}
    for name, extra in MODELS.items():
        for fold in range(args.folds):
            out = runs / f"{name}_f{fold}"
            kernel(work, out, "--preset", "demo", "--data-dir", str(data), "--budget", "40m", "--epochs",
                   str(args.fold_epochs), "--fold", str(fold), "--n-folds", str(args.folds), *extra)
            fold_tests[out.name] = demo_test_f2(data, out)
            print(out.name, "demo test F2", fold_tests[out.name], flush=True)
    result = {}
    for label, spec in [*((n, f"{runs}/{n}_f*") for n in MODELS), ("blend", f"{runs}/*")]:
        out = work / f"blend_{label}"
        kernel(work, out, "--mode", "blend", "--checkpoints", spec, "--data-dir", str(data))
        report = json.loads((out / "blend.json").read_text())
        result[label] = {**{k: report[k] for k in ("folds", "members", "weights", "blended")},
                         "demo_test_f2": demo_test_f2(data, out)}
        print(label, json.dumps(result[label]), flush=True)
    result["fold_models_demo_test_f2"] = fold_tests
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--swa", type=float, default=0.25)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 7])
    ap.add_argument("--fold-epochs", type=int, default=3)
    ap.add_argument("--demo-images", type=int, default=600)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--skip-swa", action="store_true")
    ap.add_argument("--skip-blend", action="store_true")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "ensemble.json")
    args = ap.parse_args()
    results: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copy(ROOT / "kernel.py", work / "kernel.py")
        subprocess.run([sys.executable, "kernel.py", "--budget", "30s", "--dry-run", "--out-dir", str(work / "warm"),
                        "--demo-images", str(args.demo_images)], cwd=work, capture_output=True)  # the demo data, once
        data = work / "warm" / "demo_data"
        if not args.skip_swa:
            results["swa"] = bench_swa(work, data, args)
        if not args.skip_blend:
            results["blend"] = bench_blend(work, data, args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print("written", args.json)


if __name__ == "__main__":
    main()
