"""The GPU fast path, checked on the CPU: where augmentation runs, whole-batch gathers from the cache,
the device feeder, the AMP dtype choice, and torch.compile with its fallback."""
import json
import threading

import pytest
import torch
from conftest import TINY

from kernelkit.app.cli import main
from kernelkit.build.assemble import augmentation_split
from kernelkit.build.components import batch_augment
from kernelkit.core import accel
from kernelkit.core.config import Config
from kernelkit.data.cache import build_cache
from kernelkit.data.loaders import DeviceFeeder, ImageDataset, ThreadLoader, collate_images, make_loader
from kernelkit.data.transforms import EvalTransform, TrainTransform, affine_batch
from kernelkit.engine.checkpoint import load_checkpoint
from kernelkit.inputs.competition import load_competition
from kernelkit.inputs.submission import validate_submission
from kernelkit.model.factory import create_model


# ----------------------------------------------------------------------------- where augmentation runs
@pytest.mark.parametrize("aug, gpu_aug, device, cached, expected", [
    ("light", "auto", "cuda", True, ("none", "light")),     # the fast path: rows gathered, crop/flip on the GPU
    ("strong", "auto", "cuda", True, ("none", "strong")),
    ("none", "auto", "cuda", True, ("none", "")),
    ("light", "auto", "cuda", False, ("light", "")),        # images decoded on the fly: per image on the CPU
    ("light", "auto", "cpu", True, ("light", "")),          # no GPU: per image, as before
    ("light", "", "cuda", True, ("light", "")),             # explicit off wins
    ("flip", "medium", "cpu", False, ("flip", "medium")),   # explicit level wins, alongside aug
])
def test_augmentation_runs_on_the_gpu_only_when_auto_finds_one_and_a_full_cache(aug, gpu_aug, device, cached,
                                                                                  expected):
    assert augmentation_split(aug, gpu_aug, device, cached) == expected


def test_the_batch_augmentation_uses_the_padding_fill_and_the_chosen_level():
    cfg = Config(model="test_resnet", img_size=32, pad_fill=255)
    aug = batch_augment(cfg, "multiclass", 3, "strong")
    assert aug.level == "strong" and aug.fill == 255.0
    assert batch_augment(cfg, "multiclass", 3, "") is None, "no level, no mixing: nothing to run"
    x = torch.full((64, 3, 16, 16), 255, dtype=torch.uint8)
    out, y, ok = aug(x, torch.zeros(64, dtype=torch.long), torch.ones(64))
    assert out.shape == x.shape and out.dtype == torch.float32 and ok.tolist() == [1.0] * 64
    # What the strong level's shift/scale/rotate uncovers is filled like the padding: white stays white.
    torch.manual_seed(0)
    moved = affine_batch(x.float(), degrees=30, translate=0.2, p=1.0, fill=aug.fill)
    assert torch.allclose(moved, torch.full_like(moved, 255.0), atol=1e-3)
    assert affine_batch(x.float(), degrees=30, translate=0.2, p=1.0, fill=0.0).mean() < 250, "fill matters"


# ----------------------------------------------------------------------------- whole-batch gathers
def _cached_dataset(tmp_path, single_label_dir, transform, bad: int | None = None):
    comp = load_competition(single_label_dir)
    paths = list(comp.train_paths)
    if bad is not None:
        (tmp_path / "broken.jpg").write_bytes(b"not an image")
        paths[bad] = str(tmp_path / "broken.jpg")
    cache = build_cache(paths, transform.geometry, tmp_path / "cache")
    return ImageDataset(paths, comp.train_targets, transform, 32, cache=cache), comp


def test_a_gathered_batch_equals_the_batch_built_image_by_image(tmp_path, single_label_dir):
    ds, comp = _cached_dataset(tmp_path, single_label_dir, TrainTransform(32, aug="none"), bad=5)
    idx = [7, 3, 5, 0, 11]
    fast = ds.batch(idx)
    slow = collate_images([ds[i] for i in idx])
    assert fast is not None
    assert fast[0].shape == slow[0].shape == (5, 3, 32, 32) and fast[0].dtype == torch.uint8
    assert fast[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1]) and torch.equal(fast[2], slow[2])
    assert fast[1].dtype == torch.long and fast[2].tolist() == [1, 1, 0, 1, 1], "the unreadable file is flagged"


def test_no_gather_where_each_image_needs_its_own_work(tmp_path, single_label_dir):
    ds, _ = _cached_dataset(tmp_path, single_label_dir, TrainTransform(32, aug="light"))
    assert ds.batch([0, 1]) is None, "per-image augmentation: item by item"
    plain = ImageDataset(ds.paths, ds.targets, EvalTransform(32), 32)
    assert plain.batch([0, 1]) is None, "no cache: item by item"
    val = ImageDataset(ds.paths, ds.targets, EvalTransform(32), 32, cache=ds.cache)
    assert val.batch([0, 1]) is not None, "evaluation batches are gathered too"


def test_the_threaded_loader_gives_the_same_batches_with_and_without_the_gather(tmp_path, single_label_dir):
    ds, _ = _cached_dataset(tmp_path, single_label_dir, TrainTransform(32, aug="none"))

    class ItemByItem(ImageDataset):
        batch = None  # hides the gather: the loader falls back to items

    slow_ds = ItemByItem(ds.paths, ds.targets, ds.transform, 32, cache=ds.cache)
    fast = list(make_loader(ds, 8, True, 2, seed=3))
    slow = list(make_loader(slow_ds, 8, True, 2, seed=3))
    assert len(fast) == len(slow) > 1
    for a, b in zip(fast, slow):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_the_device_feeder_passes_batches_through_on_cpu_and_stops_the_loader_early(tmp_path, single_label_dir):
    ds, _ = _cached_dataset(tmp_path, single_label_dir, TrainTransform(32, aug="none"))
    loader = ThreadLoader(ds, 4, shuffle=False, num_threads=2)
    feeder = DeviceFeeder(loader, torch.device("cpu"))
    assert len(feeder) == len(loader)
    batches = list(feeder)
    assert len(batches) == len(loader) and torch.equal(batches[0][0], ds.batch([0, 1, 2, 3])[0])
    it = iter(feeder)
    next(it)
    it.close()  # what a training loop's early break does
    assert not [t for t in threading.enumerate() if t.name.startswith("kernelkit-loader")], "loader threads left"


# ----------------------------------------------------------------------------- mixed precision
def test_amp_dtype_follows_the_hardware_unless_the_user_chose(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not accel.bf16_is_fast(cpu)
    monkeypatch.setattr(accel, "bf16_is_fast", lambda device: device.type == "cuda")  # an A100/H100
    assert accel.amp_dtype("auto", gpu) == torch.bfloat16
    assert accel.amp_dtype("fp16", gpu) == torch.float16, "the user's choice wins"
    monkeypatch.setattr(accel, "bf16_is_fast", lambda device: False)  # a T4 / P100
    assert accel.amp_dtype("auto", gpu) == torch.float16
    with pytest.raises(ValueError, match="auto | bf16 | fp16"):
        accel.amp_dtype("fp8", gpu)
    assert accel.needs_loss_scaling(True, torch.float16, gpu)
    assert not accel.needs_loss_scaling(True, torch.bfloat16, gpu), "bf16 has fp32's range"
    assert not accel.needs_loss_scaling(True, torch.float16, cpu) and not accel.needs_loss_scaling(
        False, torch.float16, gpu)


def test_a_bad_amp_dtype_is_refused_at_start_with_the_choices(single_label_dir, tmp_path, capsys):
    args = [*TINY, "--data-dir", str(single_label_dir), "--out-dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        main({}, [*args, "--amp-dtype", "fp8"])
    assert e.value.code == 2 and "'auto', 'bf16', 'fp16'" in capsys.readouterr().err
    assert main({"amp_dtype": "fp8"}, args) == 2, "the CONFIG block is checked the same way"
    captured = capsys.readouterr()
    assert "amp_dtype" in captured.err + captured.out and "fp16" in captured.err + captured.out
    assert not (tmp_path / "o" / "submission.csv").exists()


# ----------------------------------------------------------------------------- torch.compile
def _bn_buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


def _warmup(model):
    model.train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()


def test_a_failing_compile_falls_back_to_the_eager_model_untouched():
    model = create_model("test_resnet", 3)
    before = _bn_buffers(model)

    class Broken(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            self.m(x)  # runs (and moves the BatchNorm statistics) before failing, as a compiler can
            raise RuntimeError("no C++ compiler found\nmore detail")

    out = accel.compile_for_training(model, _warmup, compiler=Broken)
    assert out.model is model and out.error == "RuntimeError: no C++ compiler found"
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers()), "the dummy batch left no trace"
    assert all(p.grad is None for p in model.parameters())


def test_a_compiled_model_shares_the_weights_and_leaves_no_trace_of_the_warmup():
    model = create_model("test_resnet", 3)
    before = _bn_buffers(model)
    out = accel.compile_for_training(model, _warmup, compiler=lambda m: torch.compile(m, backend="eager"))
    assert not out.error and out.model is not model and accel.original_module(out.model) is model
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())
    assert all(p.grad is None for p in model.parameters())
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.allclose(out.model(x), model(x))


_compile = torch.compile  # the real one, before a test replaces it


@pytest.mark.parametrize("works", [True, False])
def test_a_run_with_compile_trains_saves_plain_weights_and_submits(single_label_dir, tmp_path, monkeypatch, caplog,
                                                                   works):
    calls = []

    def compiler(model, **kwargs):
        calls.append(model)
        if not works:
            raise RuntimeError("inductor: unsupported")
        return _compile(model, backend="eager")  # dynamo tracing without code generation: seconds on CPU

    monkeypatch.setattr(torch, "compile", compiler)
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="kernelkit"):
        assert main({}, [*TINY, "--data-dir", str(single_label_dir), "--out-dir", str(out), "--budget", "3m",
                         "--epochs", "2", "--compile", "--tta", "1"]) == 0
    assert len(calls) == 1
    validate_submission(out / "submission.csv", load_competition(single_label_dir))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compile"]["seconds"] >= 0
    assert (summary["compile"]["error"] == "") == works
    if not works:
        assert any("torch.compile failed" in r.message for r in caplog.records)
    ckpt = load_checkpoint(out / "best.pt")
    assert not [k for k in ckpt["model"] if "_orig_mod" in k], "checkpoints hold the plain module's weights"
    assert summary["steps"] > 0


def test_a_bf16_checkpoint_resumes_under_fp16_loss_scaling(tmp_path):
    """A schedule split over sessions can move from an H100 (bf16: no loss scale saved) to a T4 (fp16)."""
    from kernelkit.engine.checkpoint import rng_state
    from kernelkit.engine.resume import restore
    from kernelkit.engine.trainer import TrainParts

    class Fp16Scaler:  # an enabled GradScaler as on a T4 (the CPU build disables real ones)
        loaded = None

        def is_enabled(self):
            return True

        def load_state_dict(self, d):
            if not d:
                raise RuntimeError("The source state dict is empty")
            self.loaded = d

    model = create_model("test_resnet", 3)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": {}, "rng": rng_state(),
            "epoch": 1, "step": 5, "progress": 0.5, "best_score": 0.1, "threshold": 0.5}
    scaler = Fp16Scaler()
    state = restore(ckpt, TrainParts(model, opt, scaler, None), tmp_path / "last.pt", Config(), False)
    assert state.step == 5 and scaler.loaded is None, "the loss scale starts afresh"
    restore({**ckpt, "scaler": {"scale": 1024.0}}, TrainParts(model, opt, scaler, None), tmp_path / "last.pt",
            Config(), False)
    assert scaler.loaded == {"scale": 1024.0}, "fp16 -> fp16 keeps its loss scale"


def test_a_gpu_optimizer_state_resumes_with_this_machines_kernel(tmp_path):
    """Fused AdamW on a GPU; its saved state (param groups say fused=True) resumes on a CPU unfused."""
    from kernelkit.engine.checkpoint import rng_state
    from kernelkit.engine.resume import restore
    from kernelkit.engine.trainer import TrainParts
    from kernelkit.model.factory import create_optimizer

    model = create_model("test_resnet", 3)
    opt = create_optimizer(model, 1e-3, 0.05)
    assert not any(g.get("fused") for g in opt.param_groups), "no fused kernel for CPU parameters"
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group["fused"] = True  # as a GPU run writes it
    ckpt = {"model": model.state_dict(), "optimizer": saved, "scaler": {}, "rng": rng_state(), "epoch": 1,
            "step": 1, "progress": 0.1, "best_score": 0.1, "threshold": 0.5}
    resumed = create_optimizer(model, 1e-3, 0.05)
    restore(ckpt, TrainParts(model, resumed, torch.amp.GradScaler("cuda", enabled=False), None), tmp_path / "x",
            Config(), False)
    assert not any(g.get("fused") for g in resumed.param_groups)
    assert resumed.state_dict()["state"][0]["step"] == saved["state"][0]["step"], "the moments were restored"
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    resumed.step()


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")  # the absent GPU, as expected
@pytest.mark.parametrize("cache_images, device, expected", [
    (True, "cuda", ("none", "light")),   # a GPU run from the cache: the loader only gathers rows
    (False, "cuda", ("light", "")),      # decoded on the fly: per image, in the loader
    (True, "cpu", ("light", "")),
])
def test_the_training_data_puts_the_augmentation_where_the_hardware_wants_it(single_label_dir, tmp_path,
                                                                              cache_images, device, expected):
    from kernelkit.build.assemble import build_training_data
    cfg = Config(model="test_resnet", img_size=32, batch_size=8, num_workers=0, aug="light",
                 cache_images=cache_images, cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "out"))
    # Only the wiring is checked: nothing runs on the (absent) GPU.
    data = build_training_data(cfg, load_competition(single_label_dir), torch.device(device))
    assert (data.train_loader.dataset.transform.aug, data.gpu_aug) == expected
    batch = next(iter(data.train_loader))
    assert batch[0].dtype == torch.uint8 and batch[0].shape[1:] == (3, 32, 32)


# ----------------------------------------------------------------------------- compile warm-up (issue 21)
def _recording_compiler(seen):
    """A stand-in for torch.compile that records the input sizes its model is run at."""
    def compiler(model, **kwargs):
        seen.append(("kwargs", kwargs))

        class Recorded(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self._orig_mod = model

            def forward(self, x):
                seen.append(x.shape[-1])
                return model(x)
        return Recorded()
    return compiler


@pytest.mark.parametrize("resize_start, expected", [(0.5, [32, 40, 48, 64]), (0.0, [64])])
def test_compile_warms_up_every_progressive_resizing_size_inside_the_measured_time(monkeypatch, caplog,
                                                                                   resize_start, expected):
    """Warmed up at img_size only, the first real step (at half size) recompiled on the training clock."""
    from kernelkit.build.components import compile_step_model
    from kernelkit.data.transforms import IMAGENET
    from kernelkit.engine.resolution import schedule_from
    from kernelkit.engine.trainer import TrainParts
    from kernelkit.model.losses import get_loss
    seen = []
    monkeypatch.setattr(torch, "compile", _recording_compiler(seen))
    cfg = Config(model="test_resnet", img_size=64, batch_size=2, compile=True, resize_start=resize_start)
    sched = schedule_from(64, resize_start, cfg.resize_full_at)
    assert (sorted(set(sched.sizes())) if sched else [64]) == expected, "the stages this test expects"
    model = create_model("test_resnet", 3)
    parts = TrainParts(model, torch.optim.AdamW(model.parameters()), None, get_loss("ce", "multiclass"))
    with caplog.at_level("INFO", logger="kernelkit"):
        compile_step_model(cfg, parts, "multiclass", 3, torch.device("cpu"), IMAGENET)
    sizes = [s for s in seen if isinstance(s, int)]
    assert sorted(set(sizes)) == expected and parts.step_model is not None
    assert ("kwargs", {"dynamic": False}) in seen, "one static graph per size, not a dynamic-shape trace"
    assert parts.compiled.sizes == tuple(expected)
    assert any("compiled in" in r.message and f"{len(expected)} input size" in r.message for r in caplog.records)


def test_compile_is_skipped_with_a_log_line_below_compute_capability_7(monkeypatch, caplog):
    """P100 (6.0): Triton refuses only after the trace time is spent, so it is never tried there."""
    from kernelkit.build.components import compile_step_model
    from kernelkit.data.transforms import IMAGENET
    from kernelkit.engine.trainer import TrainParts
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100-PCIE-16GB")
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compile attempted on a P100"))
    model = create_model("test_resnet", 3)
    parts = TrainParts(model, torch.optim.AdamW(model.parameters()), None, None)
    with caplog.at_level("INFO", logger="kernelkit"):
        compile_step_model(Config(model="test_resnet", compile=True), parts, "multiclass", 3, torch.device("cuda"),
                           IMAGENET)
    assert parts.step_model is None and parts.compiled.error.startswith("skipped")
    assert any("compile=true skipped on Tesla P100" in r.message for r in caplog.records)
    assert not accel.has_tensor_cores(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert accel.compile_unsupported(torch.device("cuda")) == "" and accel.has_tensor_cores(torch.device("cuda"))
