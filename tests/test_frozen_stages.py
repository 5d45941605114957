"""Fine-tuning keeps the pretrained high-resolution stages frozen (frozen_stages): which parameters, that a
step leaves them and their BatchNorm statistics alone, that the options and the freeze schedule respect
them, and that the auto rule only applies to weights (issue #20: steps at 1.6-2x the images/s on a CPU)."""
import copy

import pytest
import timm
import torch

from kernelkit.build.components import frozen_stages
from kernelkit.core.config import ConfigError
from kernelkit.core.options import make_config
from kernelkit.engine.swa import recompute_batchnorm
from kernelkit.model.factory import (HIGH_RESOLUTION, freeze_early, high_resolution_parameters, hold_frozen_norms,
                                     set_trainable)


def frozen_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if not p.requires_grad]


@pytest.mark.parametrize("arch, first, last", [
    ("tf_efficientnet_lite0", "conv_stem.weight", "blocks.1."),  # stride 2 stem, stages at stride 2 and 4
    ("resnet18", "conv1.weight", "layer1."),                     # mmdetection's frozen_stages=1
    ("test_convnext", "stem.0.weight", "stages.0."),              # stride-4 stem and its stage
])
def test_auto_freezes_the_stem_and_the_stages_at_stride_4(arch, first, last):
    model = timm.create_model(arch, num_classes=3)
    n = freeze_early(model, HIGH_RESOLUTION)
    names = frozen_names(model)
    assert names and names[0] == first and names[-1].startswith(last), names[-3:]
    assert n == sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any(t.startswith(last) for t in trainable), "a stage is frozen whole"
    assert len(names) == len(high_resolution_parameters(model))


def test_a_vit_has_no_high_resolution_stage_and_stays_whole():
    model = timm.create_model("test_vit", num_classes=3)
    assert freeze_early(model, HIGH_RESOLUTION) == 0 and not frozen_names(model)


def test_a_count_freezes_that_many_stages_and_never_the_last():
    model = timm.create_model("test_resnet", num_classes=3)
    freeze_early(model, 2)
    names = frozen_names(model)
    assert names[-1].startswith("layer2.") and not any(n.startswith("layer3.") for n in names)
    everything = timm.create_model("test_resnet", num_classes=3)
    freeze_early(everything, 99)
    assert any(p.requires_grad for n, p in everything.named_parameters() if n.startswith("layer4."))
    assert all(p.requires_grad for p in everything.get_classifier().parameters())


def test_a_step_leaves_frozen_weights_and_their_statistics_alone():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    freeze_early(model, HIGH_RESOLUTION)
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    hold_frozen_norms(model)
    for _ in range(2):
        torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    early = [k for k in before if k.startswith(("conv1.", "bn1.", "layer1."))]
    assert any("running_mean" in k for k in early)
    assert all(torch.equal(before[k], after[k]) for k in early), "frozen: weights and BatchNorm statistics"
    assert not torch.equal(before["layer4.0.bn1.running_mean"], after["layer4.0.bn1.running_mean"])
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


def test_the_freeze_schedule_and_copies_keep_the_early_stages_frozen():
    model = timm.create_model("test_resnet", num_classes=3)
    freeze_early(model, HIGH_RESOLUTION)
    early = frozen_names(model)
    set_trainable(model, 0)   # the head-only stage of freeze=...
    set_trainable(model, None)  # then everything: except what is frozen for the run
    assert frozen_names(model) == early
    set_trainable(model, 3)
    assert set(early) <= set(frozen_names(model))
    twin = copy.deepcopy(model)  # EMA and SWA hold copies; a copy knows its frozen norms
    twin.train()
    hold_frozen_norms(twin)
    bn = dict(twin.named_modules())
    assert not bn["layer1.0.bn1"].training and not bn["bn1"].training and bn["layer2.0.bn1"].training


def test_swa_recomputes_only_the_statistics_that_trained():
    from kernelkit.data.transforms import IMAGENET
    model = timm.create_model("test_resnet", num_classes=3)
    freeze_early(model, HIGH_RESOLUTION)
    with torch.no_grad():
        for bn in (model.layer1[0].bn1, model.layer4[0].bn1):
            bn.running_mean.fill_(7.0)  # stands for the pretrained statistics
    batches = [(torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8), None, None) for _ in range(2)]
    assert recompute_batchnorm(model, batches, torch.device("cpu"), False, IMAGENET, max_batches=2) == 2
    assert torch.all(model.layer1[0].bn1.running_mean == 7.0), "frozen: kept"
    assert not torch.any(model.layer4[0].bn1.running_mean == 7.0), "trained: recomputed from the batches"


def test_auto_means_frozen_only_with_weights_and_an_explicit_value_wins(tmp_path):
    from test_finetune import timm_folder
    folder = timm_folder(tmp_path / "w")
    scratch, _ = make_config({}, ["--model", "test_resnet"])
    tuned, _ = make_config({}, ["--pretrained-path", str(folder)])
    told, _ = make_config({}, ["--pretrained-path", str(folder), "--frozen-stages", "0"])
    forced, _ = make_config({}, ["--model", "test_resnet", "--frozen-stages", "1"])
    assert (frozen_stages(scratch), frozen_stages(tuned), frozen_stages(told), frozen_stages(forced)) == \
        (0, HIGH_RESOLUTION, 0, 1)
    with pytest.raises(ConfigError, match="frozen_stages"):
        make_config({}, ["--frozen-stages", "-2"])


def test_autopick_times_a_candidate_frozen_as_it_will_train(tmp_path, monkeypatch):
    from test_finetune import timm_folder

    from kernelkit.build import autopick
    from kernelkit.model import factory
    folder = timm_folder(tmp_path / "w")
    seen = []
    real = factory.freeze_early
    monkeypatch.setattr(factory, "freeze_early", lambda model, stages: seen.append(stages) or real(model, stages))
    cfg, _ = make_config({}, ["--model", "test_resnet", "--frozen-stages", "-1"])  # auto, and no weights in cfg
    for weights in ("", str(folder)):  # a candidate from an attached folder brings its own
        autopick.measure(autopick.Candidate("test_resnet", 32, 0.1, weights), cfg, 3, torch.device("cpu"), steps=1)
    assert seen == [0, HIGH_RESOLUTION]


def test_a_checkpoint_from_before_frozen_stages_resumes_its_weights_and_schedule(tmp_path, caplog):
    """Its optimizer holds every parameter; this run's leaves the frozen ones out: the load must not crash."""
    from kernelkit.core.config import Config
    from kernelkit.engine.checkpoint import rng_state
    from kernelkit.engine.resume import restore
    from kernelkit.engine.trainer import TrainParts
    from kernelkit.model.factory import create_optimizer
    old = timm.create_model("test_resnet", num_classes=3)
    opt = create_optimizer(old, 1e-3, 0.05)
    old(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    ckpt = {"model": old.state_dict(), "optimizer": opt.state_dict(), "scaler": {}, "rng": rng_state(), "epoch": 2,
            "step": 7, "progress": 0.4, "best_score": 0.5, "threshold": 0.5}
    new = timm.create_model("test_resnet", num_classes=3)
    freeze_early(new, HIGH_RESOLUTION)
    parts = TrainParts(new, create_optimizer(new, 1e-3, 0.05), torch.amp.GradScaler("cuda", enabled=False), None)
    with caplog.at_level("WARNING", logger="kernelkit"):
        state = restore(ckpt, parts, tmp_path / "last.pt", Config(), False)
    assert (state.step, state.epoch) == (7, 2)
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))
    assert "optimizer state not restored" in caplog.text
    new(torch.randn(2, 3, 32, 32)).sum().backward()
    parts.optimizer.step()  # and it trains on


def _frames(folder, size: tuple[int, int], n: int = 12) -> list[str]:
    from PIL import Image
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        Image.new("RGB", size, (40 * (i % 6), 90, 200)).save(folder / f"{i}.png")
        paths.append(str(folder / f"{i}.png"))
    return paths


@pytest.mark.parametrize("frame,settings,want", [
    ((32, 32), [], 0),                          # digits-like thumbnails: every CPU rung (64 px and up) is >= 2x
    ((32, 24), ["--img-size", "48"], HIGH_RESOLUTION),  # 1.5x at the size asked for: not thumbnails there
    ((96, 96), [], HIGH_RESOLUTION),            # 128 px and up is not 2x a 96 px frame: photos keep the freeze
    ((32, 32), ["--frozen-stages", "1"], 1),    # an explicit value wins
    ((32, 32), ["--pretrained-path", "none"], -1),  # no weights: nothing to resolve (auto = none at build)
])
def test_auto_trains_every_layer_of_fine_tuned_thumbnails(tmp_path, frame, settings, want, caplog):
    """frozen_stages auto with weights: thumbnails (enlarged 2x or more at the smallest size the run may
    train at) train every layer, logged; larger frames keep the high-resolution stages frozen."""
    from types import SimpleNamespace

    from test_finetune import timm_folder

    from kernelkit.build.augmentation import resolve_frozen_stages
    from kernelkit.core.context import RunContext
    folder = timm_folder(tmp_path / "w")
    cfg, _ = make_config({}, ["--pretrained-path", str(folder), *settings])
    comp = SimpleNamespace(train_paths=_frames(tmp_path / "img", frame), classes=["0", "1"])
    with caplog.at_level("INFO", logger="kernelkit"):
        ctx = resolve_frozen_stages(RunContext(cfg, None, tmp_path, tmp_path, False, 0.0), comp, "cpu")
    assert ctx.cfg.frozen_stages == want
    assert ("every layer trains" in caplog.text) == (want == 0 and cfg.frozen_stages == -1)
    if "every layer trains" in caplog.text:  # judged at the smallest size the run may train at
        assert "(64 px and up)" in caplog.text
    assert frozen_stages(ctx.cfg) == (0 if "none" in settings else want)  # what the model is built with


@pytest.mark.parametrize("stored", [0, -1, 1])  # this rule's answer; a checkpoint from before it; set by hand
def test_a_resumed_fine_tune_keeps_the_frozen_stages_it_trained_with(tmp_path, stored):
    """A restart with frozen_stages auto continues the checkpoint with the value it trained with, whatever
    a fresh answer would be (another device or weights folder changes the ladder): the resume checks,
    the input mode's and the autopick's included, then take the checkpoint. A dry run plans afresh."""
    import dataclasses
    import json
    from types import SimpleNamespace

    from test_finetune import timm_folder

    from kernelkit.build import autopick
    from kernelkit.build.augmentation import resolve_frozen_stages
    from kernelkit.core.context import RunContext
    from kernelkit.engine.checkpoint import save_checkpoint
    from kernelkit.engine.resume import check_resume
    from kernelkit.engine.run_state import STATE_FILE
    cfg, _ = make_config({}, ["--pretrained-path", str(timm_folder(tmp_path / "w"))])
    classes = ["0", "1"]
    comp = SimpleNamespace(train_paths=_frames(tmp_path / "img", (32, 32)), classes=classes)
    out = tmp_path / "out"
    out.mkdir()
    trained = dataclasses.replace(cfg, model="test_resnet", frozen_stages=stored)
    save_checkpoint({"config": trained.to_dict(), "classes": classes, "model": {}, "progress": 0.5,
                     "epoch": 1, "format_version": 2},
                    out / "last.pt")
    (out / STATE_FILE).write_text(json.dumps({"run_start": 0.0, "finished": False}))
    ctx = RunContext(dataclasses.replace(cfg, model="auto"), None, tmp_path, out, False, 0.0)
    got = resolve_frozen_stages(ctx, comp, "cpu")
    assert got.cfg.frozen_stages == stored
    assert autopick.resumed_config(got, classes) is not None  # what input_mode and autopick resume from
    assert check_resume(dataclasses.replace(got.cfg, model="test_resnet"), out / "last.pt", comp, explicit=True)
    planning = dataclasses.replace(ctx, args=SimpleNamespace(dry_run=True))
    assert resolve_frozen_stages(planning, comp, "cpu").cfg.frozen_stages == 0  # thumbnails, fresh
