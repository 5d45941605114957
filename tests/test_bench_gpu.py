"""bench/bench_gpu.py without a GPU: the skip, the table, the variant filter, the data, the parsers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_gpu  # noqa: E402

from kernelkit.inputs.competition import load_competition  # noqa: E402


def test_without_cuda_it_skips_with_a_clear_message_and_exit_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--out", str(out),
                        "--readme", str(tmp_path / "README.md")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert bench_gpu.SKIP_MESSAGE in p.stdout
    assert not out.exists()


def fake_results() -> dict:
    def row(kind, name, img_s, cores="4", dtype="bf16", status="ok", **kw):
        return {"kind": kind, "model": "resnet50", "size": 224, "batch": 128, "cores": cores, "name": name,
                "dtype": dtype, "img_s": img_s, "status": status, **kw}
    rows = [row("bound", "bound (bf16)", 4000.0), row("bound", "bound (fp16)", 3000.0, dtype="fp16"),
            row("kernel", "kernel defaults", 3800.0, gpu_util_mean=97.0, gpu_idle_max_s=0.3,
                checkpoint_timing={"blocked_s": 0.05}),
            row("kernel", "kernel: amp_dtype fp16", 1500.0, dtype="fp16", checkpoint_timing="n/a"),
            row("kernel", "kernel: compile on", None, status="skipped: option compile not in this kernel"),
            row("kernel", "kernel: cache off", None, status="failed: RuntimeError: CUDA out of memory"),
            row("reference", "reference: PIL + DataLoader (fp16)", 750.0, dtype="fp16"),
            row("bound", "bound (bf16)", 4100.0, cores="all (16)"),
            row("kernel", "kernel defaults", 2050.0, cores="all (16)")]
    return {"device": "FakeGPU", "rows": {f"{r['cores']}|{r['name']}": r for r in rows},
            "budget": {"120s": {"budget": "120s", "cores": "4", "wall_s": 131.0, "rc": 0, "submission_rows": 10,
                                "expected_rows": 10, "overrun": True, "summary_model": "resnet34",
                                "summary_img_size": 224},
                       "300s": {"budget": "300s", "cores": "4", "wall_s": None, "rc": None, "submission_rows": None,
                                "expected_rows": 10, "overrun": False, "status": "failed: OSError: disk full"}}}


def line_of(table: str, *parts: str) -> str:
    hits = [ln for ln in table.splitlines() if all(p in ln for p in parts)]
    assert len(hits) == 1, (parts, hits)
    return hits[0]


def test_table_shares_of_the_bound_skipped_and_failed_rows():
    table = bench_gpu.build_table(fake_results())
    # Each row against the bound of its own dtype and core count.
    assert "| 95% |" in line_of(table, "| 4 |", "kernel defaults")
    assert "| 50% |" in line_of(table, "| 4 |", "amp_dtype fp16")
    assert "| 25% |" in line_of(table, "| 4 |", "reference")
    assert "| 50% |" in line_of(table, "all (16)", "kernel defaults")
    assert "97%" in line_of(table, "| 4 |", "kernel defaults") and "0.3 s" in line_of(table, "| 4 |", "kernel defaults")
    assert "blocked_s 0.05" in line_of(table, "| 4 |", "kernel defaults")
    assert "skipped: option compile not in this kernel" in line_of(table, "compile on")
    assert "failed: RuntimeError: CUDA out of memory" in line_of(table, "cache off")
    assert "| n/a |" in line_of(table, "cache off")
    assert "no: OVERRUN" in line_of(table, "| 120s |")
    assert "| n/a |" in line_of(table, "| 300s |") and "failed: OSError: disk full" in line_of(table, "| 300s |")


def test_readme_markers_are_replaced_and_a_second_run_changes_nothing(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Benchmarks\n\n{bench_gpu.START}\nold table\n{bench_gpu.END}\n\n## Layout\nrest\n")
    table = bench_gpu.build_table(fake_results())
    bench_gpu.write_readme(readme, table)
    once = readme.read_text()
    bench_gpu.write_readme(readme, table)
    assert readme.read_text() == once
    assert "old table" not in once and table in once
    assert once.startswith("# x\n\n## Benchmarks\n") and once.endswith("## Layout\nrest\n")
    assert once.count(bench_gpu.START) == 1 and once.count(bench_gpu.END) == 1


def test_table_only_rebuilds_the_readme_from_the_json(tmp_path):
    out, readme = tmp_path / "gpu.json", tmp_path / "README.md"
    out.write_text(json.dumps(fake_results()))
    readme.write_text(f"a\n{bench_gpu.START}\n{bench_gpu.END}\nb\n")
    assert bench_gpu.main(["--table-only", "--out", str(out), "--readme", str(readme)]) == 0
    assert "FakeGPU" in readme.read_text() and readme.read_text().endswith("b\n")


FAKE_HELP = """usage: kernel.py
  --model NAME                    timm model name
  --gpu-aug {,flip,light,medium,strong}
                                  batch augmentation
  --aug {none,flip,light,medium,strong}
  --cache-images, --no-cache-images
                                  decode once
  --channels-last, --no-channels-last
  --amp-dtype {auto,bf16,fp16}    autocast dtype
  --compile {off,on}              torch.compile
  --resize-start X                progressive resizing
"""


def test_variants_whose_option_the_kernel_lacks_are_skipped():
    options = bench_gpu.known_options(FAKE_HELP)
    assert options["cache_images"] is True and options["amp_dtype"] == ("auto", "bf16", "fp16")
    assert options["gpu_aug"] == ("", "flip", "light", "medium", "strong") and options["resize_start"] == ()
    assert bench_gpu.variant_args(["amp_dtype=fp16"], options) == ["--amp-dtype", "fp16"]
    assert bench_gpu.variant_args(["cache_images=false"], options) == ["--no-cache-images"]
    assert bench_gpu.variant_args(["channels_last=true"], options) == ["--channels-last"]
    assert bench_gpu.variant_args(["gpu_aug=", "aug=light"], options) == ["--gpu-aug", "", "--aug", "light"]
    assert bench_gpu.variant_args(["compile=true"], options) == ["--compile", "on"]
    assert bench_gpu.variant_args(["resize_start=0.5"], options) == ["--resize-start", "0.5"]
    older = bench_gpu.known_options(FAKE_HELP.split("  --amp-dtype")[0])
    assert bench_gpu.variant_args(["compile=true"], older) == "skipped: option compile not in this kernel"
    assert bench_gpu.variant_args(["aug=none", "amp_dtype=fp16"], older) == \
        "skipped: option amp_dtype not in this kernel"


def test_every_variant_is_understood_by_the_committed_kernel_or_skipped_by_name():
    help_text = subprocess.run([sys.executable, str(ROOT / "kernel.py"), "--help"], capture_output=True,
                               text=True, timeout=60).stdout
    options = bench_gpu.known_options(help_text)
    assert {"model", "img_size", "batch_size", "epochs", "cache_dir", "gpu_aug"} <= set(options)
    for _, settings in bench_gpu.VARIANTS:
        args = bench_gpu.variant_args(settings, options)
        assert isinstance(args, list) or args.startswith("skipped: option ")


def test_generated_data_is_an_imet_like_competition_kernel_py_reads(tmp_path):
    meta = bench_gpu.make_data(tmp_path / "d", n_train=40, n_test=6, procs=2)
    comp = load_competition(tmp_path / "d")
    assert len(comp.train_paths) == 40 and len(comp.test_ids) == 6
    sizes = [Image.open(p).size for p in comp.train_paths]
    assert all(min(s) == 300 for s in sizes) and Image.open(comp.train_paths[0]).format == "JPEG"
    aspect = np.array([max(s) / min(s) for s in sizes])
    assert 0.3 < (aspect > 2).mean() < 0.8 and 0.3 < meta["aspect_gt_2"] < 0.8  # 56% expected
    # A second call with the same size reuses the folder.
    stamp = os.path.getmtime(comp.train_paths[0])
    assert bench_gpu.make_data(tmp_path / "d", n_train=40, n_test=6) == meta
    assert os.path.getmtime(comp.train_paths[0]) == stamp


def test_steady_rate_excludes_the_first_epoch(tmp_path):
    pd.DataFrame({"epoch": [0, 1, 2], "train_images": [1000, 1000, 1000], "train_s": [10.0, 1.0, 1.5],
                  "elapsed_s": [12.0, 14.0, 16.5]}).to_csv(tmp_path / "history.csv", index=False)
    rate = bench_gpu.steady_rate(bench_gpu.read_history(tmp_path))
    assert rate["img_s"] == 800.0 and rate["epochs"] == 2 and rate["first_epoch_img_s"] == 100.0
    one = bench_gpu.steady_rate([{"train_images": 500, "train_s": 5.0}])
    assert one["img_s"] == 100.0 and one["note"]
    assert bench_gpu.steady_rate([])["img_s"] is None


def test_gpu_gaps_measure_inside_the_training_phase_only():
    history = [{"train_s": 10.0, "elapsed_s": 12.0}, {"train_s": 2.0, "elapsed_s": 16.0},
               {"train_s": 2.0, "elapsed_s": 19.0}]
    start = 1000.0
    # Idle before training (start-up), busy in epochs, a 0.8 s gap at the epoch 1 -> 2 boundary,
    # idle again after training (prediction) that must not count.
    samples = [(start + t / 10, 0.0 if t < 20 or 161 <= t <= 169 or t > 190 else 90.0) for t in range(0, 260)]
    gaps = bench_gpu.gpu_gaps(samples, history, start, train_end_s=19.0)
    assert gaps["gpu_idle_max_s"] == 0.8
    assert gaps["gpu_util_mean"] == 90.0
    assert bench_gpu.gpu_gaps([], history, start, 19.0)["gpu_idle_max_s"] is None


def test_checkpoint_timing_fields_when_present():
    assert bench_gpu.checkpoint_timing({"epochs": 3, "wall_s": 10.0}) == "n/a"
    found = bench_gpu.checkpoint_timing({"checkpoint_blocked_s": 0.1, "checkpoint": "best.pt",
                                         "checkpoint_io": {"write_s": 2.0, "path": "x"}})
    assert found == {"checkpoint_blocked_s": 0.1, "checkpoint_io.write_s": 2.0}


def test_rows_from_two_devices_are_flagged():
    res = fake_results()
    next(iter(res["rows"].values()))["device"] = "OtherGPU"
    table = bench_gpu.build_table(res)
    assert "MIXED" in table.splitlines()[0] and "on OtherGPU" in table
    assert "MIXED" not in bench_gpu.build_table(fake_results())


def test_a_failing_child_is_recorded_with_its_last_stderr_line():
    code = "import sys; print('working'); sys.exit('ValueError: bad things')"
    rc, out, err, _ = bench_gpu.run_child([sys.executable, "-c", code], sorted(os.sched_getaffinity(0))[:1], 60)
    assert bench_gpu.child_json(rc, out, err) == {"status": "failed: ValueError: bad things"}
    rc, out, err, _ = bench_gpu.run_child([sys.executable, "-c", "import json; print(json.dumps({'img_s': 5.0}))"],
                                          sorted(os.sched_getaffinity(0))[:1], 60)
    assert bench_gpu.child_json(rc, out, err) == {"status": "ok", "img_s": 5.0}
    rc, _, err, _ = bench_gpu.run_child([sys.executable, "-c", "import time; time.sleep(30)"], [0], 1)
    assert rc == 124 and "timed out" in bench_gpu.child_json(rc, "", err)["status"]


def test_kernel_rows_follow_variants_skip_defaults_and_variant_cores():
    names = lambda argv, cores: [n for n, _ in bench_gpu.kernel_rows(bench_gpu.parse_args(argv), cores)]  # noqa: E731
    every = names([], "4")
    assert every[0] == "kernel defaults" and len(every) == 1 + len(bench_gpu.VARIANTS)
    assert names([], "all (16)") == ["kernel defaults"]
    assert len(names(["--variant-cores", "4,all"], "all (16)")) == len(every)
    assert names(["--variants", ""], "4") == ["kernel defaults"]
    assert names(["--variants", "cache off,compile", "--skip-defaults"], "2 (asked 4)") == \
        ["kernel: compile on", "kernel: cache off"]


def test_the_gpu_check_skips_on_cpu_after_printing_a_plan_that_fits_8_minutes(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path)}
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--check"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert bench_gpu.SKIP_MESSAGE in p.stdout and "gpu check plan" in p.stdout
    assert not list(tmp_path.iterdir()), "nothing written without a GPU"


@pytest.mark.parametrize("gpus", [1, 2])
def test_the_gpu_check_plan_covers_the_issue_and_fits_8_minutes(gpus):
    plan = bench_gpu.check_plan(bench_gpu.parse_models(bench_gpu.DEFAULT_MODELS), gpus)
    names = " | ".join(n for n, _ in plan)
    for want in ("bound resnet50@224:128", "kernel defaults resnet50@224:128", "bound convnext_tiny@320:64",
                 "kernel defaults convnext_tiny@320:64", "swa=0.25", "budget 120s"):
        assert want in names
    assert ("2 GPUs" in names) == (gpus >= 2)
    assert sum(s for _, s in plan) <= bench_gpu.CHECK_LIMIT_S
    assert dict(plan)["budget 120s"] > 120, "the budget run gets its budget and a grace"


def test_the_gpu_check_writes_under_out(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    a = bench_gpu.parse_args(["--check"])
    assert a.out == tmp_path / "gpu_check.json" and a.no_readme and a.cores == "4" and a.budgets == "120s"


def test_the_gpu_check_runs_its_planned_rows_under_their_timeouts(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    calls = []
    monkeypatch.setattr(bench_gpu, "part_child", lambda a, res, kind, model, *r, dtypes=None: calls.append(
        (kind, model, tuple(dtypes), a.timeout)))
    monkeypatch.setattr(bench_gpu, "kernel_row", lambda a, res, spec, cores, cpus, name, settings, options, cc,
                        timeout: calls.append(("kernel", spec[0], tuple(settings), timeout)))
    monkeypatch.setattr(bench_gpu, "part_budget", lambda a, res, cpus, grace_s: calls.append(
        ("budget", a.budgets, (), grace_s)))
    a = bench_gpu.parse_args(["--check"])
    bench_gpu.run_check(a, {"rows": {}}, {"amp_dtype": (), "swa": (), "compile": True, "ddp_procs": ()}, 9, gpus=2)
    t = bench_gpu.CHECK_TIMEOUTS
    assert calls == [("bound", "resnet50", ("bf16",), t["bound"]), ("kernel", "resnet50", (), t["kernel"]),
                     ("bound", "convnext_tiny", ("bf16",), t["bound"]), ("kernel", "convnext_tiny", (), t["kernel"]),
                     ("kernel", "resnet50", ("swa=0.25",), t["swa"]),
                     ("budget", "120s", (), t["budget_grace"]), ("kernel", "resnet50", ("ddp_procs=2",), t["ddp"])]
