#!/usr/bin/env python
"""Kaggle image-classification kernel: trains a timm model inside the time budget, then writes
submission.csv with test-time augmentation.

Built by build_kernel.py from src/kernelkit -- edit the CONFIG block, not the code below it.
Run:  python kernel.py [--flag value ...]   (python kernel.py --help lists every option)
With no competition under /kaggle/input and no data_dir, it runs a small generated demo.
"""

import time as _time

_STARTED_AT = _time.time()  # the budget clock starts here, before the slow imports

# ----------------------------------------------------------------------------- CONFIG
# Your settings: uncomment and edit. Precedence: defaults < preset < CONFIG < command-line flags.
# build_kernel.py keeps everything between the two marker lines when it rebuilds kernel.py (and
# --check ignores it); it fills them for you with:
#   python build_kernel.py --set key=value [--set key=value ...] [--preset NAME] [--reset-config]
# >>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>> CONFIG START (yours)
CONFIG = dict(
    # mode='train',                         # train: train then predict | infer: predict from saved checkpoints | blend: weight K-fold runs' test probabilities by their out-of-fold scores
    # preset='',                            # named preset applied under your settings (demo, ...)
    # data_dir='',                          # competition folder; empty = find it under /kaggle/input, else run the demo (never on Kaggle)
    # id_column='',                         # train.csv column holding the image ids; empty = detect (sample submission, known names)
    # label_column='',                      # train.csv column holding the labels; empty = detect (sample submission, known names)
    # train_images='',                      # folder of the training images inside data_dir; empty = detect (train, train_images, ...)
    # test_images='',                       # folder of the test images inside data_dir; empty = detect (test, test_images, ...)
    # image_ext='',                         # only files with this extension are images (when a.jpg and a.png both exist); empty = any of .jpg .jpeg .png .webp .bmp .tif .tiff .gif
    # format='auto',                        # auto | multilabel_csv | single_label_csv | folder
    # out_dir='',                           # outputs (checkpoints, submission.csv); empty = /kaggle/working or ./outputs
    # checkpoints='',                       # infer mode: checkpoint file, folder or glob; blend mode: run output folders (comma-separated, globs allowed), each with test_probs.npy and oof/
    # model='auto',                         # timm model name; auto = the largest of a small ladder (resnet10t..resnet34 on CPU, resnet18..convnext_tiny on GPU) that fits auto_min_epochs epochs, timed at start; auto or empty with a timm weights folder = the architecture in its config.json
    # pretrained_path='',                   # local weights: a file (.safetensors/.pth/.bin) or a timm/Hugging Face folder (config.json + model.safetensors, e.g. a Kaggle Model); empty = on Kaggle with model=auto, a timm weights folder among the attached inputs (several: autopick ranks them), else random init; none = random init, no search. With weights, the options you leave unset take the fine-tuning recipe (FINETUNE in core/options.py)
    # drop_rate=0.0,                        # dropout before the classifier
    # head='linear',                        # linear | mlp (BatchNorm, Dense head_hidden, ReLU, Dropout: the Scene-15 head)
    # head_hidden=256,                      # mlp head width
    # head_dropout=0.5,                     # dropout in a custom head
    # model2='',                            # second backbone whose pooled features are concatenated with the first (Helsinki ensemble)
    # pretrained_path2='',                  # local weights of model2
    # freeze=0.0,                           # share of training with the backbone frozen (head only): 1 = linear probe, 0.3 = two-stage fine-tune
    # unfreeze_blocks=0,                    # after the frozen stage train the last N backbone blocks/stages (0 = all)
    # frozen_stages=-1,                     # stem and the first N backbone stages frozen for the whole run, their BatchNorm statistics kept: steps skip the gradients of the largest activations (0 = none; -1 auto = with weights, the stem and the stages at stride <= 4, else none; none for thumbnails, images enlarged 2x or more at every size the run may train at)
    # layer_decay=0.0,                      # layer-wise LR decay, e.g. 0.75 (0 = off)
    # ema=0.0,                              # EMA decay of the weights, e.g. 0.999; the EMA is validated and predicts (0 = off)
    # swa=0.0,                              # average the weights over this last share of the schedule, e.g. 0.25 (SWA; BatchNorm recomputed after): it predicts when it validates at least as well (0 = off)
    # img_size=0,                           # square input size; 0 or 'auto' = the images' median size (never upscaled past it), lowered until auto_min_epochs fit
    # auto_min_epochs=10,                   # model/img_size auto: the epochs the chosen pair must fit in the training time
    # pad_aspect=2.0,                       # input_mode pad: pad to square when long/short side exceeds this (0 = always resize)
    # pad_fill=255,                         # grey level of the padding (iMet seed pads with white)
    # input_mode='auto',                    # pad: each image resized (or padded, see pad_aspect) to one img_size square | squeeze: each image stretched to one square, whatever its aspect | tiles: short side resized to img_size, `tiles` squares along the long side, the network sees each and takes the max over them (long strips keep small objects at scale) | rect: each image at one img_size square's pixel count in the shape of its aspect ratio (buckets 1:1 to 1:5), batches grouped by shape | auto: rect when fine-tuning pretrained weights and at least a quarter of the sampled training images are 1:2 or longer (tiles where rect cannot run: compile, a fixed-size model; then squeeze when the autopick fits the tiles' auto_min_epochs at no size or only at its smallest), else pad (measured: README, input modes; the log says which and why)
    # tiles=0,                              # input_mode=tiles: squares per image along the long side, 2-6; longer images are shrunk to fit them (0 = the 75th percentile of the training images' long/short ratio, rounded, 2-3)
    # aug='auto',                           # auto (light, or flip for thumbnails: images enlarged 2x or more to img_size) | none | flip | light (flip + random resized crop) | medium (+ colour jitter) | strong (+ shift/scale/rotate, noise)
    # gpu_aug='auto',                       # batch augmentation on the training device: auto = on a GPU with the training images cached, `aug` runs there on whole batches and the CPU only gathers cached rows; '' = off (aug runs per image on the CPU) | flip | light | medium | strong
    # mixup=0.0,                            # mixup alpha (0 = off)
    # cutmix=0.0,                           # cutmix alpha (0 = off); with both, each batch picks one
    # resize_start=0.5,                     # progressive resizing: train at this fraction of img_size first, in up to 4 stages, at the full img_size from resize_full_at of the schedule on; stages are shares of the wall clock; validation at the stage's size until the last stage, the best checkpoint from the largest size reached, TTA at img_size (0 = off)
    # resize_full_at=0.75,                  # progressive resizing: share of the schedule after which training is at the full img_size, in (0, 1]
    # cache_images=True,                    # decode each training image once to img_size into a uint8 cache reused every epoch
    # cache_dir='',                         # image cache folder; empty = /kaggle/temp on Kaggle (not saved as output), else <out_dir>/cache
    # cache_max_gb=15.0,                    # cap on the cache; images beyond it are decoded every epoch (0 = free disk)
    # output_cap_gb=-1.0,                   # cap on what the run keeps in out_dir, checkpoints and a cache there included (checked before writing); -1 = 19.5 on Kaggle, which keeps at most 20 GB of /kaggle/working, else none; 0 = none
    # budget='8h30m',                       # wall-clock budget for the whole kernel, e.g. 9h, 8h30m, 90s
    # margin='auto',                        # safety margin kept free at the end of the budget; auto = 2% + 2s, at most 10m
    # epochs=0,                             # 0 = as many as fit the budget (schedule over time); >0 = fixed epochs
    # batch_size=32,                        # images per optimiser step (per process under DDP)
    # lr=0.001,                             # peak AdamW learning rate
    # weight_decay=0.05,                    # AdamW weight decay
    # warmup=0.05,                          # fraction of training spent warming up
    # clip_grad=0.0,                        # clip the gradient norm to this (0 = off)
    # schedule='linear',                    # decay to zero at the end of training: linear | cosine
    # val_fraction=0.1,                     # held-out share of train for validation and thresholds (0 = train on all)
    # fold=-1,                              # K-fold: validate on this fold (0..n_folds-1) instead of val_fraction; -1 = off
    # n_folds=5,                            # K-fold: number of folds (iterative stratification for multi-label)
    # loss='auto',                          # auto (bce / ce) | bce | bce_sum | focal | asl | ce | complement
    # loss_args='',                         # loss parameters, e.g. 'gamma=2,reduce=sum' (focal) or 'label_smoothing=0.1'
    # label_smoothing=-1.0,                 # single-label cross-entropy label smoothing (loss auto/ce/complement, unless loss_args sets it); -1 = auto: 0.1 when fine-tuning from weights, else 0
    # class_balanced=False,                 # weight classes by effective number of samples (Cui et al. 2019)
    # balanced_sampling=0.0,                # draw images ~ 1/count(class)^this (0 = plain shuffle, 0.5 = sqrt, 1 = equal)
    # amp=True,                             # mixed precision on GPU
    # amp_dtype='auto',                     # auto = bf16 on GPUs with fast bf16 (A100, H100, L4), fp16 + loss scaling elsewhere (T4, P100) | bf16 | fp16
    # compile=False,                        # torch.compile the model for training; the compile runs at start, its time is charged to the budget, and a failure falls back to eager (not under DDP)
    # channels_last=True,                   # GPU: NHWC memory layout (faster convolutions with AMP)
    # num_workers=-1,                       # -1 = all CPU cores
    # mp_context='',                        # DataLoader worker start method: '' (default) | spawn | forkserver | fork
    # seed=42,                              # seeds Python, NumPy, torch and every loader worker; stored in the checkpoints
    # deterministic=False,                  # GPU: deterministic kernels (cudnn.deterministic, no benchmark); slower
    # ddp_procs=0,                          # data-parallel processes: 0 = one per GPU when several are visible (T4 x2), 1 = off
    # ddp_backend='',                       # '' = nccl on GPU, gloo on CPU
    # checkpoint_every='20m',               # also save last.pt at this wall-clock interval
    # resume=True,                          # continue an unfinished run from out_dir/last.pt (its time counts against the budget)
    # resume_from='',                       # continue from this checkpoint of an earlier session (e.g. an attached dataset); the budget is what this session has left
    # sessions=1,                           # Kaggle sessions one schedule is laid over: each trains its 1/N slice, saves and submits; the next continues with resume_from=<previous>/last.pt
    # max_train_images=0,                   # use only this many training images (0 = all); for quick runs
    # grace='20s',                          # on SIGTERM/SIGINT: stop training and predict within about this long (fewer TTA views if needed), then exit 0 with a submission
    # tta=2,                                # test-time augmentation views: 1 = none, 2 = + horizontal flip
    # beta=2.0,                             # multi-label metric: F-beta averaged per image (iMet: 2)
    # threshold=-1.0,                       # multi-label threshold; <0 = chosen on validation (rules.settled_threshold)
    # threshold_rule='global',              # multi-label search: global | group (by 'prefix::' of label names) | class
    # min_labels=0,                         # multi-label: always emit at least this many labels per image
    # max_labels=0,                         # multi-label: at most this many labels per image (0 = no cap)
    # demo_images=1000,                     # demo: number of generated training images
)
# <<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<< CONFIG END (yours)

# Bundled sources of src/kernelkit, one module each (generated; do not edit).
_SOURCES = {
'kernelkit': r'''"""kernelkit: train a timm model inside a Kaggle time budget and write submission.csv."""
__version__ = "0.1.0"
''',
'kernelkit.app': r'''"""The thin top: the command line (`cli`), the failure policy and exit codes (`failure`), one launch
path for a process or ranks (`launch`), the jobs (`train_job`, `infer_job`, `blend_job`, `dry_run`), checkpoint-to-submission
(`predictor`), the files a run leaves (`outputs`, `train_reports`) and the generated demo (`demo`).
Nothing imports `app`."""
''',
'kernelkit.app.blend_job': r'''"""The blend job (`--mode blend`): K-fold run folders -> CV score per fold, per model and blended ->
weights and the threshold rule fitted on the out-of-fold rows -> a validated submission.

Input problems (a folder without out-of-fold files, shapes of another data set) are refusals
(exit 2) found before anything is written. Nothing is trained or predicted: the runs' saved
test probabilities are blended, so this takes seconds.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from ..core.config import Config, ConfigError
from ..core.context import PREDICTING, RunContext
from ..core.fileio import write_json
from ..decide.ensemble import (
    BlendInputError,
    Member,
    find_run_dirs,
    fit_weights,
    group_members,
    load_member,
    mix,
    search_rows,
)
from ..decide.rules import RuleSettings, refine_rule, score_validation
from ..decide.thresholds import ThresholdRule
from ..inputs.competition import Competition
from .predictor import write_predictions

log = logging.getLogger("kernelkit")


def load_members(cfg: Config, comp: Competition) -> list[Member]:
    try:
        groups = group_members(find_run_dirs(cfg.checkpoints))
        return [load_member(g, len(comp.train_paths), comp.num_classes, len(comp.test_ids)) for g in groups]
    except BlendInputError as e:
        raise ConfigError(str(e)) from e


def scorer(cfg: Config, task: str, targets: np.ndarray) -> Callable[..., dict]:
    """(probs of `rows`, rows, settle=True) -> score_validation's answer: the competition metric, with the
    global threshold chosen (multi-label) unless the user fixed it; settle=False takes the exact best, for
    the weight search's hundreds of calls (half the cost, and a smoother objective)."""
    def score(probs: np.ndarray, rows: np.ndarray, settle: bool = True) -> dict:
        return score_validation(task, targets[rows], probs, cfg.threshold, cfg.beta, cfg.min_labels, cfg.max_labels,
                                settle=settle)
    return score


def cv_report(members: list[Member], score: Callable) -> dict:
    """Score of every fold file on its own rows, and of every member over all its rows."""
    folds = {f"{m.name}:{name}": round(score(m.oof[idx], idx)["score"], 5)
             for m in members for name, idx in m.folds.items()}
    per_member = {m.name: round(score(m.oof[m.covered], np.flatnonzero(m.covered))["score"], 5) for m in members}
    return {"folds": folds, "members": per_member}


def blend_rule(cfg: Config, comp: Competition, targets: np.ndarray, probs: np.ndarray, found: dict) -> ThresholdRule:
    settings = RuleSettings.of(cfg)
    if comp.task != "multilabel":
        return settings.global_rule(0.5)
    return refine_rule(settings, found["threshold"], comp.class_names, targets, probs)


def run_blend(ctx: RunContext, comp: Competition) -> dict:
    cfg = ctx.cfg
    members = load_members(cfg, comp)
    rows = np.flatnonzero(np.logical_and.reduce([m.covered for m in members]))
    if not len(rows):
        raise ConfigError(f"checkpoints={cfg.checkpoints!r}: the models' out-of-fold rows share no image")
    score = scorer(cfg, comp.task, comp.train_targets)
    report = cv_report(members, score)
    sample = search_rows(rows, cfg.seed)
    weights, _ = fit_weights([m.oof[sample] for m in members], lambda p: score(p, sample, settle=False)["score"])
    blended = mix([m.oof[rows] for m in members], weights)
    found = score(blended, rows)
    rule = blend_rule(cfg, comp, comp.train_targets[rows], blended, found)
    ctx.phase = PREDICTING
    test = mix([m.test for m in members], weights)
    write_predictions(comp, test, np.ones(len(test), bool), comp.task, rule, ctx.out_dir)
    report.update(weights={m.name: round(float(w), 4) for m, w in zip(members, weights)}, oof_rows=int(len(rows)),
                  blended=round(found["score"], 5), metric=found["metric"],
                  runs={m.name: [str(d) for d in m.dirs] for m in members},
                  threshold_rule=rule.to_dict() if comp.task == "multilabel" else None)
    write_json(ctx.out_dir / "blend.json", report)
    for name, s in report["folds"].items():
        log.info("CV %s %s: %.4f", found["metric"], name, s)
    for m, w in zip(members, weights):
        log.info("model %s (%d run folders): out-of-fold %.4f, weight %.3f", m.name, len(m.dirs),
                 report["members"][m.name], w)
    log.info("blend of %d model(s) on %d out-of-fold images: %s %.4f (best fold %.4f, best model %.4f)",
             len(members), len(rows), found["metric"], found["score"], max(report["folds"].values()),
             max(report["members"].values()))
    return {"mode": "blend", **{k: report[k] for k in ("weights", "members", "blended", "metric", "oof_rows")}}
''',
'kernelkit.app.cli': r'''"""The command line and the exit contract (the policy behind it: `failure`). Imports nothing heavy until the config is known good,
so a typo is refused in well under a second, before torch is even imported.

    0  a valid submission.csv was written (failures after training started are logged loudly
       and listed in summary.json under "problems")
    2  refused before training: the message names the option, file or folder and what is wrong
    4  --dry-run: the plan does not fit the budget
    1  no submission could be made; the reason is the last thing in the log
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..core import env
from ..core.clock import at as clock_at
from ..core.clock import now as clock_now
from ..core.config import Config, ConfigError
from ..core.context import EXIT_NO_SUBMISSION, RunContext, setup_logging
from ..core.options import make_config
from ..core.stopping import handle_signals
from ..core.weights import find_weights_folders
from ..inputs.discovery import find_competition
from .failure import after_crash, refuse

log = logging.getLogger("kernelkit")


def resolve(config_block: dict[str, Any] | None, argv: list[str] | None, t_start: float) -> RunContext:
    """Config and paths, with no side effects beyond creating out_dir. No competition found and no
    data_dir: the demo (with its preset, unless another was chosen), except on Kaggle, where that is
    a refusal (inputs.find_competition)."""
    cfg, args = make_config(config_block, argv)
    out_dir = env.out_dir_for(cfg.out_dir)
    data_dir = Path(cfg.data_dir) if cfg.data_dir else find_competition(env.input_root(), env.on_kaggle())
    is_demo = data_dir is None
    if is_demo and not cfg.preset:
        cfg, args = make_config({**(config_block or {}), "preset": "demo"}, argv)
    found = None
    if searches_weights(cfg):
        found = tuple(find_weights_folders(env.input_root(), skip=data_dir))
        if found:  # as if the user had set it, so the fine-tuning recipe applies (several: autopick ranks)
            cfg, args = make_config({**(config_block or {}), "pretrained_path": str(found[0])}, argv)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"out_dir={str(out_dir)!r} cannot be created: {e}") from e
    return RunContext(cfg, args, data_dir or out_dir / "demo_data", out_dir, is_demo, t_start, weights_found=found)


def searches_weights(cfg: Config) -> bool:
    """On Kaggle, a training run with model=auto and no pretrained_path looks for attached weights
    (pretrained_path=none turns that off)."""
    return cfg.mode == "train" and env.on_kaggle() and cfg.model == "auto" and not cfg.pretrained_path


def main(config_block: dict[str, Any] | None = None, argv: list[str] | None = None,
         started_at: float | None = None) -> int:
    """`started_at`: process start (kernel.py records it before importing torch), so the budget
    counts the imports too."""
    setup_logging()
    try:
        ctx = resolve(config_block, argv, clock_at(started_at) if started_at else clock_now())
    except ConfigError as e:
        return refuse(str(e))
    with handle_signals() as stop:
        ctx.stop = stop
        return run(ctx)


def run(ctx: RunContext) -> int:
    try:
        from .ranks import torchrun_rank  # torch: only now
        rank = torchrun_rank(ctx)
        from .launch import launch  # timm and the jobs
        return launch(ctx, rank)
    except KeyboardInterrupt:
        log.error("interrupted twice: stopping without a submission")
        return EXIT_NO_SUBMISSION
    except Exception as e:  # noqa: BLE001
        return after_crash(ctx, e)
''',
'kernelkit.app.demo': r'''"""A small iMet-style competition generated on the fly, so the kernel runs with no data attached.

Tags are things a CNN can learn in a couple of CPU minutes: background colour ("culture") and
shapes ("tag"). Sizes and aspect ratios vary like iMet's, some images have no label, some are PNG.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from ..decide.metrics import fbeta_per_image
from ..inputs.competition import Competition
from ..inputs.submission import cells_to_onehot

log = logging.getLogger("kernelkit")

LABELS = ["culture::crimson", "culture::azure", "tag::circle", "tag::square", "tag::triangle",
          "tag::cross", "tag::stripes", "tag::dots"]
_BACKGROUND = {0: (200, 40, 50), 1: (40, 90, 210)}


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, w: int, h: int, rng: random.Random) -> None:
    s = max(8, int(min(w, h) * rng.uniform(0.35, 0.6)))
    x, y = rng.randint(0, w - s), rng.randint(0, h - s)
    color = tuple(rng.randint(0, 60) if rng.random() < 0.5 else rng.randint(200, 255) for _ in range(3))
    if kind == "circle":
        draw.ellipse([x, y, x + s, y + s], fill=color)
    elif kind == "square":
        draw.rectangle([x, y, x + s, y + s], fill=color)
    elif kind == "triangle":
        draw.polygon([(x + s // 2, y), (x, y + s), (x + s, y + s)], fill=color)
    elif kind == "cross":
        t = max(2, s // 5)
        draw.rectangle([x + s // 2 - t, y, x + s // 2 + t, y + s], fill=color)
        draw.rectangle([x, y + s // 2 - t, x + s, y + s // 2 + t], fill=color)


def _make_image(labels: set[int], rng: random.Random) -> Image.Image:
    if rng.random() < 0.15:  # iMet has strips up to ~1:5
        long, short = rng.randint(200, 320), rng.randint(48, 70)
        w, h = (long, short) if rng.random() < 0.5 else (short, long)
    else:
        w, h = rng.randint(80, 200), rng.randint(80, 200)
    bg = next((_BACKGROUND[k] for k in (0, 1) if k in labels),
              tuple(rng.randint(110, 170) for _ in range(3)))
    arr = np.clip(np.array(bg, np.int16) + np.random.default_rng(rng.randrange(2**32)).integers(
        -25, 26, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    if 6 in labels:  # stripes across the whole image
        step = max(6, min(w, h) // 6)
        for yy in range(0, h, step):
            draw.rectangle([0, yy, w, yy + step // 3], fill=(250, 250, 250))
    if 7 in labels:
        for _ in range(12):
            cx, cy, r = rng.randint(0, w), rng.randint(0, h), max(2, min(w, h) // 25)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(20, 20, 20))
    for k, kind in ((2, "circle"), (3, "square"), (4, "triangle"), (5, "cross")):
        if k in labels:
            _draw_shape(draw, kind, w, h, rng)
    return img


def _random_labels(rng: random.Random) -> set[int]:
    labels = set()
    u = rng.random()
    if u < 0.3:
        labels.add(0)
    elif u < 0.6:
        labels.add(1)
    labels |= {k for k in range(2, len(LABELS)) if rng.random() < 0.25}
    return labels


def make_demo_competition(root: Path, n_train: int = 1000, n_test: int = 200, seed: int = 0) -> Path:
    """Write train/, test/, train.csv, labels.csv, sample_submission.csv under `root` (once)."""
    root = Path(root)
    done = root / ".complete"
    if done.is_file() and done.read_text().strip() == f"{n_train} {n_test} {seed}":
        return root
    rng = random.Random(seed)
    for sub in ("train", "test"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            image_id = f"{rng.getrandbits(64):016x}"
            labels = _random_labels(rng)
            ext = ".png" if rng.random() < 0.2 else ".jpg"
            img = _make_image(labels, rng)
            img.save(root / split / f"{image_id}{ext}", quality=90) if ext == ".jpg" else img.save(
                root / split / f"{image_id}{ext}")
            rows.append((split, image_id, " ".join(str(k) for k in sorted(labels))))
    df = pd.DataFrame(rows, columns=["split", "id", "attribute_ids"])
    df[df.split == "train"][["id", "attribute_ids"]].to_csv(root / "train.csv", index=False)
    pd.DataFrame({"attribute_id": range(len(LABELS)), "attribute_name": LABELS}).to_csv(root / "labels.csv", index=False)
    test = df[df.split == "test"][["id"]].assign(attribute_ids="")
    test.to_csv(root / "sample_submission.csv", index=False)
    # Answers for checking the demo's test score; a real competition never has this file.
    df[df.split == "test"][["id", "attribute_ids"]].to_csv(root / "test_solution.csv", index=False)
    done.write_text(f"{n_train} {n_test} {seed}")
    log.info("demo competition written to %s (%d train, %d test images)", root, n_train, n_test)
    return root


def score_demo_submission(data_dir: Path, out_dir: Path, comp: Competition) -> float | None:
    """F2 per image of the written submission against the generated test answers."""
    sol = data_dir / "test_solution.csv"
    if comp.task != "multilabel" or not sol.is_file():
        return None
    truth = pd.read_csv(sol, dtype=str, keep_default_na=False)
    sub = pd.read_csv(out_dir / "submission.csv", dtype=str, keep_default_na=False)
    return fbeta_per_image(cells_to_onehot(comp, truth.attribute_ids.tolist()),
                           cells_to_onehot(comp, sub.iloc[:, 1].tolist()))
''',
'kernelkit.app.dry_run': r'''"""--dry-run: time a few training steps and TTA batches on the real data, then plan the budget."""
from __future__ import annotations

import dataclasses
import logging

import torch

from ..build.assemble import build_training_data
from ..build.components import build_parts, fit_options
from ..core.clock import now as clock_now
from ..core.context import RunContext
from ..engine.budget import BudgetClock, InferenceReserve, budget_seconds
from ..engine.plan import Plan, make_plan
from ..engine.resolution import ResolutionSchedule, effective_ips, fmt_ips
from ..engine.trainer import Trainer
from ..inputs.competition import Competition
from ..model.factory import preprocess_of
from .predictor import probe_inference
from .train_job import new_reserve

TRAIN_STEPS, INFER_BATCHES = 12, 4
STAGE_STEPS = 5  # per stage size with progressive resizing (the first is not timed)

log = logging.getLogger("kernelkit")


def dry_run(ctx: RunContext, comp: Competition, device: torch.device) -> Plan:
    cfg = ctx.cfg
    setup_s = clock_now() - ctx.t_start
    data = build_training_data(cfg, comp, device)
    t_build = clock_now()
    parts = build_parts(cfg, comp.task, comp.num_classes, data.train_targets, device, data.gpu_aug)
    build_s = clock_now() - t_build
    budget_s, margin_s = budget_seconds(cfg)
    opts = fit_options(cfg, preprocess_of(parts.model), device)
    sched = opts.resolution
    ips_at = {}
    # Each stage size timed on its own (a constant schedule at that size): the plan is the
    # time-weighted sum over the stages, not the speed of the first one.
    for size in sorted(set(sched.sizes())) if sched is not None else [cfg.img_size]:
        fixed = dataclasses.replace(opts, resolution=ResolutionSchedule(size) if sched is not None else None)
        trainer = Trainer(parts, fixed, BudgetClock(budget_s, margin_s), InferenceReserve(0, 0, 1), device)
        tr = trainer.train_epoch(data.train_loader, max_steps=STAGE_STEPS if sched is not None else TRAIN_STEPS)
        ips_at[size] = tr["images_per_s"]
    train_ips = effective_ips(ips_at, sched, over_clock=not cfg.epochs)
    if sched is not None:
        log.info("progressive resizing: %s; training throughput %s -> %.1f img/s over the schedule",
                 sched.describe(), fmt_ips(ips_at), train_ips)
    inf = probe_inference(parts.model, cfg, comp, device, INFER_BATCHES, "dry-run")
    reserve = new_reserve(cfg, comp, data, parts, build_s)  # the very reserve training will keep back
    reserve.observe_probe(inf)
    return make_plan(budget_s=budget_s, margin_s=margin_s, setup_s=setup_s, train_ips=train_ips, reserve=reserve,
                     n_train=len(data.train_targets), epochs=cfg.epochs)
''',
'kernelkit.app.failure': r'''"""The failure policy, in one place: what a failure costs depends on when it happens.

- Before training starts (phase SETUP), a bad option, data folder, sample submission or resume
  checkpoint is a refusal: exit 2 within seconds, the message naming what to change (`refuse`,
  `is_refusal`; under data parallelism rank 0 leaves the verdict in summary.json, `refuse_in_rank`).
- Once training has started, each later step runs under `Outcome.guard`: a failure is logged
  loudly, listed in summary.json under "problems", and costs only itself.
- The test prediction falls back from best.pt to last.pt to the weights in memory
  (`prediction_sources`, then the job's model).
- An exception that still escapes a job after start-up is a bug, but the checkpoints on disk
  still deserve a submission: `after_crash` logs it and predicts from the best one (`rescue`), as
  the launcher does when its ranks end without a submission and one process cannot carry on.
- The exit status follows: 0 when a valid submission was written, else 1 (`exit_status`).

The phase lives in one object shared by every copy of the run's context (`RunContext.phase`), so
a job working on a copy (autopick's, with the concrete model) moves the whole run past SETUP.
Nothing heavy at module level: the command line refuses through here before torch is imported.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.config import ConfigError
from ..core.context import EXIT_NO_SUBMISSION, EXIT_OK, EXIT_REFUSED, PREDICTING, SETUP, RunContext
from ..core.fileio import write_json

log = logging.getLogger("kernelkit")

# What a refusal looks like: the user's setting, data or file is wrong (raised before training only).
REFUSALS = (ConfigError, ValueError, FileNotFoundError, NotADirectoryError)


@dataclass
class Outcome:
    """What the job reports: summary.json's content, and whether a valid submission exists."""
    summary: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    submitted: bool = False

    def problem(self, what: str) -> None:
        """Something failed after training started: loud in the log, recorded in the summary."""
        log.error("!!! %s\n%s", what, traceback.format_exc())
        self.problems.append(what)

    def guard(self, what: str, fn: Callable, *args, **kwargs) -> Any:
        """Run a step that must not cost the submission; None when it fails."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            self.problem(f"{what} failed: {type(e).__name__}: {e}")
            return None

    def exit_status(self) -> int:
        return exit_status(self.submitted)


def exit_status(submitted: bool) -> int:
    return EXIT_OK if submitted else EXIT_NO_SUBMISSION


def refuse(message: str) -> int:
    """Exit 2 with the reason on stderr (where people look) and in the log."""
    log.error("refused: %s", message)
    print(f"kernelkit: refused: {message}", file=sys.stderr, flush=True)
    return EXIT_REFUSED


def is_refusal(ctx: RunContext, e: BaseException) -> bool:
    return ctx.phase == SETUP and isinstance(e, REFUSALS)


def refuse_in_rank(ctx: RunContext, e: BaseException, is_main: bool) -> int:
    """A data-parallel rank refused: rank 0 leaves the verdict for the launcher in summary.json."""
    if is_main:
        log.error("refused: %s", e)
        write_json(ctx.out_dir / "summary.json", {"exit_status": EXIT_REFUSED, "refused": str(e)})
    return EXIT_REFUSED


def after_crash(ctx: RunContext, e: BaseException) -> int:
    """An exception escaped the job: a refusal before training, else logged and rescued from disk."""
    if is_refusal(ctx, e):
        return refuse(f"{e}")
    print_fatal(e)
    if ctx.phase == SETUP or ctx.cfg.mode != "train":
        return EXIT_NO_SUBMISSION
    try:
        return rescue(ctx)
    except Exception as again:  # noqa: BLE001
        print_fatal(again)
        log.error("no submission could be written")
        return EXIT_NO_SUBMISSION


def prediction_sources(out_dir: Path) -> list[Path]:
    """The checkpoints to predict from, in the order to try them: best.pt, then last.pt."""
    from ..engine.checkpoint import BEST, LAST
    return [p for p in (Path(out_dir) / BEST, Path(out_dir) / LAST) if p.is_file()]


def rescue(ctx: RunContext) -> int:
    """Training ended without a submission: predict from its best checkpoint."""
    from ..build.assemble import open_competition
    from ..core import distributed
    from ..engine.budget import BudgetClock, budget_seconds
    from ..engine.run_state import run_start
    from .infer_job import run_infer
    sources = prediction_sources(ctx.out_dir)
    if not sources:
        log.error("training ended without a submission and left no checkpoint to predict from")
        return EXIT_NO_SUBMISSION
    log.error("!!! training ended without a submission; predicting from %s", sources[0])
    cfg = dataclasses.replace(ctx.cfg, mode="infer", checkpoints=str(sources[0]))
    rctx = dataclasses.replace(ctx, cfg=cfg)
    rctx.phase = PREDICTING
    summary = run_infer(rctx, open_competition(rctx), distributed.SINGLE.device(),
                        BudgetClock(*budget_seconds(cfg), start_time=run_start(ctx.out_dir, ctx.t_start)))
    write_json(ctx.out_dir / "summary.json", {**summary, "exit_status": EXIT_OK, "rescued": True})
    return EXIT_OK


def print_fatal(e: BaseException) -> None:
    """The traceback with source lines: kernel.py registers its bundled modules with linecache, which
    the traceback module reads (the interpreter's default hook reads files from disk, and there are
    none)."""
    log.error("fatal error: %s: %s\n%s", type(e).__name__, e, "".join(traceback.format_exception(e)))
''',
'kernelkit.app.infer_job': r'''"""The infer job: average the TTA probabilities of one or more checkpoints and write the submission.

Each checkpoint rebuilds its own model, input size and threshold rule (predictor.load_predictor,
the same path the train job predicts with). The first checkpoint's measured speed decides how
many TTA views the others can afford; one that cannot fit even one view is skipped, so a
submission is always written in time.
"""
from __future__ import annotations

import glob
import logging
from pathlib import Path

import numpy as np
import torch

from ..core.config import ConfigError, parse_duration
from ..core.context import PREDICTING, RunContext
from ..core.fileio import write_npy
from ..decide.rules import RuleSettings, ensemble_rule
from ..engine.budget import BudgetClock, affordable_tta
from ..engine.checkpoint import INFERENCE_DIR, INFERENCE_META
from ..inputs.competition import Competition
from .predictor import load_predictor, plan_tta, predict_test, write_predictions

log = logging.getLogger("kernelkit")


def find_checkpoints(spec: str) -> list[Path]:
    """A checkpoint file, an inference folder (INFERENCE_DIR), a run's folder (its best*.pt, else
    any *.pt, else its inference folder) or a glob of those."""
    p = Path(spec)
    if (p / INFERENCE_META).is_file():
        found = [p]
    elif p.is_dir():
        found = (sorted(p.glob("best*.pt")) or sorted(p.glob("*.pt"))
                 or [d for d in [p / INFERENCE_DIR] if (d / INFERENCE_META).is_file()])
    elif p.is_file():
        found = [p]
    else:
        found = sorted(Path(x) for x in glob.glob(spec))
    if not found:
        raise ConfigError(f"checkpoints={spec!r}: no checkpoint file matches")
    return found


def views_for(i: int, n: int, wanted: int, seconds_per_view: float | None, clock: BudgetClock) -> int:
    """TTA views for checkpoint i of n: its share of the time left; 0 = skip it."""
    if seconds_per_view is None:
        return wanted
    share = clock.remaining() / (n - i)
    if share < seconds_per_view:
        return 0
    return affordable_tta(wanted, 1, 1.0 / seconds_per_view, share)


def run_infer(ctx: RunContext, comp: Competition, device: torch.device, clock: BudgetClock) -> dict:
    cfg, settings = ctx.cfg, RuleSettings.of(ctx.cfg)
    paths = find_checkpoints(cfg.checkpoints)
    probs_sum, ok, rules, used = None, None, [], []
    seconds_per_view: float | None = None
    for i, path in enumerate(paths):
        if used and ctx.stop.requested:
            log.warning("stop requested: averaging the %d checkpoint(s) predicted so far", len(used))
            break
        tta = views_for(i, len(paths), cfg.tta, seconds_per_view, clock)
        if tta == 0:
            log.warning("no time left for %s and %d more checkpoint(s); skipped", path, len(paths) - i - 1)
            break
        pred = load_predictor(path, device, settings, cfg.channels_last)
        if pred.classes != comp.classes:
            raise ConfigError(f"{path}: trained on a different label set than the {comp.format} data in {ctx.data_dir}")
        ctx.phase = PREDICTING  # from here on a failure is not the user's setting: no refusal
        if seconds_per_view is None:
            tta = plan_tta(cfg.tta, 1, None, clock.remaining(), ctx.stop, parse_duration(cfg.grace))
        elif tta < cfg.tta:
            log.warning("%s: %d TTA views instead of %d to stay inside the budget", path.name, tta, cfg.tta)
        out = predict_test(pred, comp, cfg, device, tta, ctx.stop)
        seconds_per_view = out["seconds_per_view"]
        write_npy(ctx.out_dir / f"test_probs_{path.stem}.npy", np.asarray(out["probs"], np.float32))
        if probs_sum is None:
            probs_sum = out["probs"]
        else:
            probs_sum += out["probs"]  # in place: one (N, C) sum whatever the number of checkpoints
        ok = out["ok"]
        rules.append(pred.rule)
        used.append({"checkpoint": str(path), "model": pred.config.model, "tta": tta, "val_score": pred.val_score})
        log.info("%s: %s, val score %s, %d TTA views", path, pred.config.model, pred.val_score, tta)
    rule = ensemble_rule(rules, settings)
    probs_sum /= len(used)
    write_predictions(comp, probs_sum, ok, comp.task, rule, ctx.out_dir)
    return {"checkpoints": used, "threshold_rule": rule.to_dict(), "wall_s": round(clock.elapsed(), 1)}
''',
'kernelkit.app.launch': r'''"""One launch path for one process, spawned ranks (Kaggle's T4 x2: no torchrun in a script
kernel) and torchrun. A failing rank stops every rank (SIGTERM, then SIGKILL); when the ranks end
without a valid submission the launcher carries on in one process (resuming their last.pt, on the
same clock), or, after a stop request, predicts from the best checkpoint (`failure.rescue`). Ranks
that cannot meet within seconds: the spawned ones end and the launcher goes on alone; under
torchrun rank 0 trains alone and the others refuse."""
from __future__ import annotations

import dataclasses
import json
import logging
import signal

import torch

from ..build import autopick
from ..build.assemble import open_competition
from ..build.augmentation import resolve_augmentation, resolve_frozen_stages
from ..build.input_mode import resolve_input_mode
from ..core import distributed, env
from ..core.clock import now as clock_now
from ..core.config import ConfigError
from ..core.context import (
    EXIT_NO_SUBMISSION,
    EXIT_OK,
    EXIT_PLAN_DOES_NOT_FIT,
    EXIT_REFUSED,
    SETUP,
    TRAINING,
    Phase,
    RunContext,
    setup_logging,
)
from ..core.distributed import DistInfo
from ..core.fileio import write_json
from ..core.stopping import handle_signals
from ..core.weights import weights_lines
from ..engine.budget import BudgetClock, budget_seconds, fmt_seconds
from ..engine.run_state import finish_run, run_start
from ..inputs.competition import Competition
from .blend_job import run_blend
from .demo import make_demo_competition, score_demo_submission
from .failure import REFUSALS, Outcome, is_refusal, refuse_in_rank, rescue
from .infer_job import run_infer
from .ranks import join_ranks, supervise
from .train_job import run_train

log = logging.getLogger("kernelkit")


def timm_version() -> str:
    import timm
    return timm.__version__


def announce(ctx: RunContext) -> None:
    for line in weights_lines(ctx.cfg.model, ctx.cfg.pretrained_path, ctx.weights_found, ctx.cfg.mode == "train"):
        log.info(line)
    env.check_versions({"torch": torch.__version__, "timm": timm_version()})
    log.info("kernelkit: torch %s, timm %s, %s, config:\n%s", torch.__version__, timm_version(),
             "on Kaggle" if env.on_kaggle() else "local", ctx.cfg.pretty())
    save_config(ctx)
    if ctx.is_demo:
        log.info("no competition data found: running the built-in demo (set data_dir= for a real competition)")
        make_demo_competition(ctx.data_dir, ctx.cfg.demo_images, max(50, ctx.cfg.demo_images // 5), ctx.cfg.seed)


def save_config(ctx: RunContext) -> None:
    try:
        ctx.cfg.save(ctx.out_dir / "config.json")
    except Exception as e:  # noqa: BLE001  (a full disk here must not cost the run; the log has the config)
        log.error("!!! could not write config.json (%s)", e)


def data_parallel_processes(ctx: RunContext) -> int:
    """How many training processes: the user's ddp_procs, or one per visible GPU. Options that data
    parallelism cannot do yet keep an automatic choice at one process; an explicit one is refused."""
    cfg = ctx.cfg
    if cfg.mode != "train" or ctx.args.dry_run:
        return 1
    procs = distributed.wanted_processes(cfg.ddp_procs)
    blockers = [k for k in ("freeze", "balanced_sampling") if getattr(cfg, k) > 0]
    if procs > 1 and blockers:
        if cfg.ddp_procs > 1:
            raise ConfigError(f"ddp_procs={cfg.ddp_procs} cannot be combined with {' and '.join(blockers)} yet; "
                              "set ddp_procs=1")
        log.warning("%s is not supported with data-parallel training yet: training in one process",
                    " and ".join(blockers))
        return 1
    return procs


def launch(ctx: RunContext, torchrun: DistInfo | None = None) -> int:
    """`torchrun`: this process's rank when torchrun started it, already joined (ranks.torchrun_rank)."""
    if torchrun is not None:  # started by torchrun: one process per rank already
        return run_rank(ctx, torchrun, joined=True)
    procs = data_parallel_processes(ctx)
    if procs == 1:
        return run_rank(ctx, distributed.SINGLE)
    announce(ctx)  # once, before the ranks start: the demo data must exist for all of them
    open_competition(ctx)  # a refusal here, in the launcher, is an exit 2 like any other
    (ctx.out_dir / "summary.json").unlink(missing_ok=True)  # the ranks' verdict, not an earlier run's
    ctx.phase = TRAINING
    status = launch_ranks(ctx, procs)
    return status if status in (EXIT_OK, EXIT_REFUSED) else carry_on_alone(ctx)


def launch_ranks(ctx: RunContext, procs: int) -> int:
    """Spawn one process per rank and watch them; a SIGTERM to us is passed on. -> rank 0's exit status."""
    import torch.multiprocessing as mp
    port = distributed.free_port()
    log.info("starting %d data-parallel processes (%s)", procs, distributed.default_backend(ctx.cfg.ddp_backend))
    # Spawned interpreters inherit an ignored SIGTERM until their own handler is up, so a signal
    # forwarded while a rank is still importing torch does not kill it (it is re-sent below).
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        released = mp.get_context("spawn").Array("b", procs, lock=False)  # distributed.release
        procs_ctx = mp.start_processes(rank_worker, args=(procs, port, ctx, released), nprocs=procs, join=False,
                                       start_method="spawn")
    finally:
        signal.signal(signal.SIGTERM, previous)
    log.info("rank pids: %s", " ".join(f"{r}={p.pid}" for r, p in enumerate(procs_ctx.processes)))
    supervise(ctx, procs_ctx.processes, released)
    summary = ctx.out_dir / "summary.json"
    return int(json.loads(summary.read_text()).get("exit_status", EXIT_NO_SUBMISSION)) if summary.is_file() \
        else EXIT_NO_SUBMISSION


def rank_worker(rank: int, world_size: int, port: int, ctx: RunContext, released=None) -> None:  # noqa: ANN001
    """Entry of a spawned rank (module level, so spawn can import it). Any failure ends the process
    non-zero, which makes the launcher stop every rank: nobody waits on a dead peer. Rank 0 leaves
    its verdict in summary.json (2 for a refusal)."""
    setup_logging()
    if rank:
        log.setLevel(logging.WARNING)
    distributed.share_release_flags(released)
    info = DistInfo(rank, world_size, rank, distributed.default_backend(ctx.cfg.ddp_backend))
    with handle_signals() as stop:
        ctx = dataclasses.replace(ctx, stop=stop, stage=Phase(SETUP))
        try:
            status = run_rank(ctx, info, init_method=f"tcp://127.0.0.1:{port}", announced=True)
        except distributed.RendezvousFailed as e:  # the launcher carries on in one process
            log.error("!!! rank %d: %s", rank, e)
            status = EXIT_NO_SUBMISSION
        except REFUSALS as e:
            if not is_refusal(ctx, e):
                raise
            status = refuse_in_rank(ctx, e, info.is_main)
    if status != EXIT_OK:
        raise SystemExit(status)


def run_rank(ctx: RunContext, info: DistInfo, init_method: str = "env://", announced: bool = False,
             joined: bool = False) -> int:
    if info.enabled and not joined:
        if info.rank:
            log.setLevel(logging.WARNING)
        info = join_ranks(ctx, info, init_method)
    try:
        if info.is_main and not announced:
            announce(ctx)
        distributed.main_done(info, ctx.t_start + budget_seconds(ctx.cfg)[0])  # rank 0 announced alone (demo data)
        return run_job(ctx, info)
    finally:
        distributed.shutdown(info)


def run_job(ctx: RunContext, info: DistInfo) -> int:
    out_dir = ctx.out_dir
    comp = open_competition(ctx)
    if ctx.cfg.mode in ("infer", "blend"):
        summary = (run_blend(ctx, comp) if ctx.cfg.mode == "blend" else
                   run_infer(ctx, comp, info.device(), BudgetClock(*budget_seconds(ctx.cfg), start_time=ctx.t_start)))
        write_json(out_dir / "summary.json", {**summary, "exit_status": EXIT_OK})
        log.info("done in %s: %s", fmt_seconds(clock_now() - ctx.t_start), summary)
        return EXIT_OK
    given = ctx.cfg
    ctx = resolve_frozen_stages(ctx, comp, info.device().type)  # before input_mode: resumes compare it
    ctx = resolve_input_mode(ctx, comp)  # before autopick: tiles cost their count in throughput
    ctx = autopick.resolve(ctx, comp, info, every=ctx.args.dry_run)  # model/img_size 'auto' -> concrete
    ctx = resolve_augmentation(ctx, comp)  # after autopick: it reads img_size
    if ctx.cfg != given and info.is_main:  # config.json records what the autos resolved to
        save_config(ctx)
    cfg = ctx.cfg
    if ctx.args.dry_run:
        from .dry_run import dry_run
        plan = dry_run(ctx, comp, info.device())
        write_json(out_dir / "plan.json", plan.to_dict())
        log.info("dry-run plan for %s on %s:\n%s", cfg.model, info.device(), plan.table())
        return EXIT_OK if plan.fits else EXIT_PLAN_DOES_NOT_FIT
    outcome = run_train(ctx, comp, info)
    if not info.is_main:
        return EXIT_OK
    return report(ctx, comp, outcome, info)


def report(ctx: RunContext, comp: Competition, outcome: Outcome, info: DistInfo) -> int:
    cfg, out_dir, s = ctx.cfg, ctx.out_dir, outcome.summary
    status = outcome.exit_status()
    outcome.guard("finishing the run state", finish_run, out_dir)
    s.update(wall_s=round(clock_now() - run_start(ctx.out_dir, ctx.t_start), 1), exit_status=status, world_size=info.world_size,
             problems=outcome.problems, stopped_by=ctx.stop.signal_name or None, model=cfg.model, img_size=cfg.img_size,
             input_mode=cfg.input_mode, tiles=cfg.input_tiles())
    if ctx.is_demo and outcome.submitted:
        s["demo_test_score"] = outcome.guard("demo score", score_demo_submission, ctx.data_dir, out_dir, comp)
    outcome.guard("writing summary.json", write_json, out_dir / "summary.json", s)
    metric = f"F{cfg.beta:g} per image" if comp.task == "multilabel" else "accuracy"
    log.info("validation %s %.4f (label-prior baseline %.4f); %s used; submission: %s", metric,
             s.get("val_score") or float("nan"), s.get("baseline") or float("nan"), fmt_seconds(s["wall_s"]),
             (out_dir / "submission.csv").resolve() if outcome.submitted else "NONE")
    if s.get("demo_test_score") is not None:
        log.info("demo test F2 against the generated answers: %.4f", s["demo_test_score"])
    if outcome.problems:
        log.error("!!! %s, but %d step(s) failed: %s", "the submission was written" if outcome.submitted
                  else "NO submission could be written", len(outcome.problems), "; ".join(outcome.problems))
    return status


def carry_on_alone(ctx: RunContext) -> int:
    """The ranks ended without a submission (a rank failed, or they never met). With no stop
    requested, this process goes on alone: it resumes from their last.pt (or starts over), on the
    same clock. A stop request, or a failure here, predicts from the best checkpoint there is."""
    if not ctx.stop.requested:
        log.error("!!! data-parallel training ended without a submission: continuing in one process")
        cfg = dataclasses.replace(ctx.cfg, ddp_procs=1, resume=True)
        alone = dataclasses.replace(ctx, cfg=cfg, stage=Phase(SETUP))
        try:
            if run_rank(alone, distributed.SINGLE, announced=True) == EXIT_OK:
                return EXIT_OK
        except Exception as e:  # noqa: BLE001  (what was learned is still on disk)
            log.error("!!! training in one process failed too: %s: %s", type(e).__name__, e)
    return rescue(ctx)
''',
'kernelkit.app.outputs': r'''"""What the train job leaves in out_dir after the submission: the inference weights, and on Kaggle
no image cache (everything in /kaggle/working is saved as output)."""
from __future__ import annotations

import logging

import torch

from ..build.assemble import cache_root
from ..core import env
from ..core.context import RunContext
from ..core.storage import checkpoint_bytes, remove_cache_from_output
from ..engine.budget import BudgetClock
from ..engine.checkpoint import INFERENCE_DIR, Checkpointer, export_inference, load_checkpoint
from .failure import Outcome

log = logging.getLogger("kernelkit")

# Reading the checkpoint back (just written: mostly in the page cache) and writing a third of it took
# 0.13 s for the demo's 134 MB best.pt here; 200 MB/s and 1 s of overhead leave room for a slow disk.
EXPORT_BYTES_PER_S = 200e6


def export_seconds(model: torch.nn.Module, ema: bool) -> float:
    """What export_submitted will cost, kept in the inference reserve from the first step."""
    n_params = sum(p.numel() for p in model.parameters())
    return 1.0 + 2 * checkpoint_bytes(n_params, ema) / EXPORT_BYTES_PER_S


def export_submitted(saver: Checkpointer, outcome: Outcome, clock: BudgetClock) -> None:
    """The checkpoint the submission came from, as an inference folder (weights only: a fraction of
    best.pt, which also holds the optimizer), when the budget has room for it."""
    saver.flush()
    path = saver.path(str(outcome.summary.get("checkpoint", "")))
    if not outcome.submitted or not path.is_file():
        return
    if clock.remaining() < 1.0 + 2 * path.stat().st_size / EXPORT_BYTES_PER_S:
        log.warning("no time left to write the inference weights; %s holds them", path.name)
        return
    folder = export_inference(load_checkpoint(path), saver.path(INFERENCE_DIR))
    log.info("inference weights: %s (from %s; --mode infer --checkpoints %s)", folder, path.name, folder)


def finish_outputs(ctx: RunContext, saver: Checkpointer, outcome: Outcome, clock: BudgetClock) -> None:
    outcome.guard("writing the inference weights", export_submitted, saver, outcome, clock)
    if env.on_kaggle():
        outcome.guard("removing the image cache from the output", remove_cache_from_output, cache_root(ctx.cfg),
                      ctx.out_dir)
''',
'kernelkit.app.predictor': r'''"""The one path from a checkpoint (or the model in memory) to a submission, shared by the train job
and the infer job: rebuild the model, pick its threshold rule, plan the TTA views that fit the
time left, predict, write submission.csv and the probabilities."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..build.assemble import test_loader
from ..build.components import model_from_config
from ..core.accel import amp_dtype
from ..core.clock import now as clock_now
from ..core.config import Config
from ..core.fileio import write_npy
from ..core.stopping import StopFlag
from ..data.transforms import IMAGENET, Preprocess, tta_views
from ..decide.labels import decode
from ..decide.rules import RuleSettings, rule_from_checkpoint
from ..decide.thresholds import ThresholdRule
from ..engine.budget import affordable_tta
from ..engine.checkpoint import inference_weights, load_checkpoint
from ..engine.evaluate import predict
from ..inputs.competition import Competition
from ..inputs.submission import format_predictions, write_submission
from ..model.factory import preprocess_of

log = logging.getLogger("kernelkit")


@dataclass
class Predictor:
    name: str
    model: torch.nn.Module
    config: Config  # the training run's config: input size, padding, model
    task: str
    classes: list[str]
    rule: ThresholdRule
    val_score: float | None = None
    preprocess: Preprocess = IMAGENET  # what training normalised with (stored in the checkpoint)


def load_predictor(path: Path, device: torch.device, settings: RuleSettings | None = None,
                   channels_last: bool = False) -> Predictor:
    ckpt = load_checkpoint(path, "cpu")
    cfg = Config.from_stored(ckpt.get("config", {}))
    model = model_from_config(cfg, len(ckpt["classes"]), with_weights=False)
    model.load_state_dict(inference_weights(ckpt))
    model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Predictor(name=Path(path).stem, model=model, config=cfg, task=ckpt["task"], classes=list(ckpt["classes"]),
                     rule=rule_from_checkpoint(ckpt, settings), val_score=ckpt.get("best_score"),
                     preprocess=Preprocess.from_dict(ckpt.get("preprocess")))


def predict_test(pred: Predictor, comp: Competition, run_cfg: Config, device: torch.device, tta: int,
                 stop: StopFlag | None = None) -> dict:
    """Test probabilities of one predictor with `tta` views. The input geometry is the training
    run's; batch size and workers are this run's (the hardware may differ)."""
    cfg = Config.from_stored({**pred.config.to_dict(), "batch_size": run_cfg.batch_size,
                              "num_workers": run_cfg.num_workers, "mp_context": run_cfg.mp_context})
    t0 = clock_now()
    out = predict(pred.model, test_loader(cfg, comp, device), device, pred.task, tta_views(tta), run_cfg.amp,
                  run_cfg.channels_last, desc=f"test {pred.name}", stop=stop, pre=pred.preprocess,
                  amp_dtype=amp_dtype(run_cfg.amp_dtype, device))
    out["seconds_per_view"] = (clock_now() - t0) / tta
    return out


def probe_inference(model: torch.nn.Module, cfg: Config, comp: Competition, device: torch.device, batches: int,
                    desc: str) -> dict:
    """Predict the first `batches` batches of real test images (their files, the eval transform, the
    run's batch size, every TTA view of `cfg.tta`): what the final prediction will cost per image."""
    n = min(len(comp.test_paths), batches * 2 * cfg.batch_size)  # test loaders use twice the training batch
    t0 = clock_now()
    loader = test_loader(cfg, comp, device, limit=n)
    # rect reads each test image's header here: a cost per image; the other modes' set-up is a fixed one
    setup_s = clock_now() - t0 if cfg.input_mode == "rect" else 0.0
    out = predict(model, loader, device, comp.task, tta_views(cfg.tta), cfg.amp, cfg.channels_last, desc=desc,
                  pre=preprocess_of(model), amp_dtype=amp_dtype(cfg.amp_dtype, device))
    out["setup_s_per_image"] = setup_s / max(1, n)
    return out


def plan_tta(wanted: int, n_images: int, images_per_s: float | None, seconds_left: float,
             stop: StopFlag | None = None, grace_s: float = 20.0) -> int:
    """TTA views that fit `seconds_left` at the measured speed; after a stop request, what fits the grace."""
    if stop is not None and stop.requested:
        seconds_left = min(seconds_left, grace_s - (clock_now() - stop.at))
    tta = affordable_tta(wanted, n_images, images_per_s, seconds_left)
    if tta < wanted:
        log.warning("predicting with %d TTA view(s) instead of %d to stay inside the %s", tta, wanted,
                    "grace after the stop request" if stop is not None and stop.requested else "budget")
    return tta


def write_predictions(comp: Competition, probs: np.ndarray, ok: np.ndarray, task: str, rule: ThresholdRule,
                      out_dir: Path) -> Path:
    """Decode, write submission.csv (validated before it replaces anything) and the raw probabilities."""
    if (~ok).any():
        log.warning("%d test images could not be read; their rows use the model's output on a blank image",
                    int((~ok).sum()))
    cells = format_predictions(comp, decode(task, probs, rule=rule))
    path = out_dir / "submission.csv"
    write_submission(comp, cells, path)
    log.info("submission written: %s (%d rows)", path.resolve(), len(cells))
    try:
        write_npy(out_dir / "test_probs.npy", np.asarray(probs, np.float32))  # no copy when float32
    except Exception as e:  # noqa: BLE001  (the submission is what counts; the probabilities are extra)
        log.error("could not save test_probs.npy (%s)", e)
    return path
''',
'kernelkit.app.ranks': r'''"""Joining the other ranks, before anything slow is imported: a rank that cannot meet its peers is
told in seconds (torch is all a rendezvous needs; timm and the jobs load after)."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time

import torch

from ..core import distributed, env
from ..core.config import ConfigError
from ..core.context import RunContext
from ..core.distributed import DistInfo

log = logging.getLogger("kernelkit")

RANK_GRACE_S = 10.0  # after a rank failed: how long the others get to end on SIGTERM before SIGKILL


def torchrun_rank(ctx: RunContext) -> DistInfo | None:
    """This process's rank, joined to the others, when torchrun (or its variables) started it (SINGLE
    when rank 0 had to go on alone); None otherwise."""
    info = distributed.from_torchrun()
    if info is None:
        return None
    info = dataclasses.replace(info, backend=distributed.default_backend(ctx.cfg.ddp_backend))
    if not info.enabled:
        return info
    if info.rank:
        log.setLevel(logging.WARNING)
    return join_ranks(ctx, info, "env://")


def join_ranks(ctx: RunContext, info: DistInfo, init_method: str) -> DistInfo:
    """The process group, or under torchrun, when the ranks cannot meet within seconds: rank 0 trains
    alone (and says so), the others refuse. Spawned ranks raise RendezvousFailed to the launcher."""
    threads = torch.get_num_threads()  # torch's own choice for this machine, now shared between the ranks
    torch.set_num_threads(distributed.cpu_share(env.cpu_count(), info.world_size, cap=threads))
    try:
        distributed.init(info, init_method, ctx.stop)
        return info
    except distributed.RendezvousFailed as e:
        if init_method != "env://":
            raise
        if info.rank:
            raise ConfigError(f"rank {info.rank} of {info.world_size}: {e}; only rank 0 writes the submission, so this "
                              "rank stops (check MASTER_ADDR / MASTER_PORT, or start one process)") from e
        log.warning("!!! %s: training in one process instead of %d", e, info.world_size)
        torch.set_num_threads(threads)
        return distributed.SINGLE


def supervise(ctx: RunContext, ranks: list, released) -> None:  # noqa: ANN001  (distributed.release flags)
    """Until every rank has ended. When a rank fails while its peers still need it, nobody waits on
    it: the others are told to finish (SIGTERM: under gloo their next collective fails at once) and
    killed RANK_GRACE_S later if still inside one. A rank that fails after its collectives ended
    (rank 1 exiting while rank 0 predicts) is only logged: rank 0 finishes on its own clock."""
    failed_at = main_ended_at = None
    while any(p.is_alive() for p in ranks):
        if ctx.stop.requested:  # idempotent in the ranks; repeated for ranks that were still starting
            _signal_alive(ranks, signal.SIGTERM)
        for r, p in enumerate(ranks):
            if p.exitcode not in (None, 0) and failed_at is None and not (released[r] or released[0]):
                failed_at = time.time()
                log.error("!!! data-parallel rank %d ended with %s: stopping the other ranks", r,
                          _exit_text(p.exitcode))
                _signal_alive(ranks, signal.SIGTERM)
        if main_ended_at is None and not ranks[0].is_alive():
            main_ended_at = time.time()  # the others have nothing left to do: RANK_GRACE_S to exit
        now = time.time()
        if (failed_at is not None and not released[0] and now - failed_at > RANK_GRACE_S) or \
                (main_ended_at is not None and now - main_ended_at > RANK_GRACE_S):
            log.error("!!! ranks still running %.0f s after a peer failed or rank 0 ended: killing them",
                      RANK_GRACE_S)
            _signal_alive(ranks, signal.SIGKILL)
            failed_at = main_ended_at = float("inf")  # once
        for p in ranks:
            p.join(0.25)
    for r, p in enumerate(ranks):
        p.join()
        if p.exitcode and released[r]:
            log.warning("data-parallel rank %d ended with %s after its training was done", r, _exit_text(p.exitcode))


def _signal_alive(ranks: list, sig: int) -> None:
    for p in ranks:
        if p.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)


def _exit_text(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
''',
'kernelkit.app.train_job': r'''"""The train job: competition -> training -> a submission from the best checkpoint.

Before training, everything that can be checked is (the data, the sample submission, the resume
checkpoint, the time left after the measured inference reserve): a problem there is a refusal
(ConfigError, exit 2). Once training starts, whatever fails, a submission is still written from
the best weights available, and the failure is logged loudly and recorded in summary.json.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..build.assemble import TrainingData, build_training_data, fit_outputs
from ..build.components import build_parts, compile_step_model, count_parameters, fit_options, seed_everything
from ..core import distributed
from ..core.clock import now as clock_now
from ..core.config import Config, ConfigError, parse_duration
from ..core.context import PREDICTING, TRAINING, RunContext
from ..core.distributed import DistInfo
from ..decide.reports import write_label_statistics
from ..decide.rules import RuleSettings, refine_rule
from ..decide.thresholds import ThresholdRule, prior_baseline
from ..engine.budget import BudgetClock, InferenceReserve, budget_seconds, fmt_seconds
from ..engine.checkpoint import BEST, Checkpointer
from ..engine.resume import check_resume, restore
from ..engine.run_state import begin_run
from ..engine.trainer import FitResult, FitState, Trainer, TrainParts, Validation
from ..inputs.competition import Competition
from ..model.factory import preprocess_of
from .failure import Outcome, prediction_sources
from .outputs import export_seconds, finish_outputs
from .predictor import Predictor, load_predictor, plan_tta, predict_test, probe_inference, write_predictions
from .train_reports import validation_reports, write_history

log = logging.getLogger("kernelkit")

PROBE_BATCHES = 3  # the first batch carries loader start-up; two more give the steady speed with prefetch
MIN_TRAIN_SHARE = 0.25
CACHE_SHARE = 0.25  # of the time left at start that building the image cache may take


def measure_reserve(cfg: Config, comp: Competition, model: torch.nn.Module, device: torch.device,
                    reserve: InferenceReserve) -> None:
    """Before the first step: predict a few batches of real test images (real eval transform, real
    batch size, every TTA view), so the reserve is measured, not guessed, from the first epoch on."""
    if not comp.test_paths:
        return
    if device.type != "cuda":  # a CPU's image-views/s do not depend on the view: one view, half the probe's time
        cfg = dataclasses.replace(cfg, tta=1)
    out = probe_inference(model, cfg, comp, device, PROBE_BATCHES, "inference probe")
    reserve.observe_probe(out)
    log.info("inference probe: %.1f image-views/s, loader start-up %.1fs -> reserve %s for %d test images x %d "
             "views + %d validation images", out["images_per_s"], out["startup_s"],
             fmt_seconds(reserve.seconds()), reserve.n_test, reserve.tta, reserve.n_val)


def new_reserve(cfg: Config, comp: Competition, data: TrainingData, parts: TrainParts,
                build_s: float) -> InferenceReserve:
    """The time to keep for everything after training, before it is measured: the final validation and
    test prediction, the inference weights written after the submission, the model built again to
    load best.pt for the prediction (`build_s`), the weight average's work."""
    reserve = InferenceReserve(len(comp.test_ids), len(data.val_targets), cfg.tta)
    reserve.overhead_s += export_seconds(parts.model, cfg.ema > 0) + build_s
    if parts.swa is not None:
        reserve.extra_images, reserve.extra_loaders = parts.swa.extra_images(data.train_loader, reserve.n_val)
    return reserve


def fit_reserve_to_budget(clock: BudgetClock, reserve: InferenceReserve, cfg: Config) -> None:
    """Leave training at least MIN_TRAIN_SHARE of what is left: fewer TTA views first (said loudly),
    and when even one view leaves no time to train, refuse before training (exit 2)."""
    def train_left() -> float:
        return clock.total_s - clock.margin_s - reserve.seconds() - clock.elapsed()

    while reserve.tta > 1 and train_left() < MIN_TRAIN_SHARE * clock.remaining():
        reserve.tta -= 1
        log.warning("!!! inference with tta=%d would leave too little time to train: planning %d view(s) "
                    "(reserve now %s)", cfg.tta, reserve.tta, fmt_seconds(reserve.seconds()))
    if train_left() <= 0:
        raise ConfigError(
            f"budget={cfg.budget!r} leaves no time to train: {fmt_seconds(clock.elapsed())} already used by start-up, "
            f"inference needs ~{fmt_seconds(reserve.seconds())} (measured, {reserve.tta} view), margin "
            f"{fmt_seconds(clock.margin_s)}. Raise budget, or lower img_size / pick a faster model")


@dataclass
class TrainRun:
    """What `prepare` builds before the first step, and what the steps after training read: the
    prediction (`submit`) and everything around it (`finish`). `saver` and `result` come with training."""
    device: torch.device
    clock: BudgetClock
    data: TrainingData
    parts: TrainParts  # parts.model: the plain module (not the data-parallel wrapper)
    state: FitState
    reserve: InferenceReserve
    saver: Checkpointer | None = None
    result: FitResult | None = None


def prepare(ctx: RunContext, comp: Competition, info: DistInfo) -> TrainRun:
    """Everything before the first step. Raises ConfigError for what the user must change."""
    cfg, out_dir = ctx.cfg, ctx.out_dir
    if info.enabled and (cfg.freeze > 0 or cfg.balanced_sampling > 0):
        raise ConfigError("freeze and balanced_sampling are not supported with data-parallel training yet; "
                          "set ddp_procs=1")
    device = info.device()
    seed_everything(cfg.seed + info.rank, cfg.deterministic)
    run_start, resume_path = begin_run(out_dir, cfg.resume, ctx.t_start) if info.is_main else (0.0, None)
    run_start, resume_path = distributed.broadcast_object(info, (run_start, resume_path))
    explicit = resume_path is None and bool(cfg.resume_from)
    resume_path = resume_path or (Path(cfg.resume_from) if cfg.resume_from else None)
    ckpt = check_resume(cfg, resume_path, comp, explicit)
    clock = BudgetClock(*budget_seconds(cfg), start_time=run_start)
    data_cfg = fit_outputs(cfg, comp, out_dir, count_parameters(cfg, comp.num_classes)) if info.is_main else cfg
    data = build_training_data(data_cfg, comp, device, info, ctx.stop,
                               cache_deadline=clock_now() + CACHE_SHARE * max(clock.remaining(), 0.0))
    t_build = clock_now()
    parts = build_parts(cfg, comp.task, comp.num_classes, data.train_targets, device, data.gpu_aug)
    build_s = clock_now() - t_build
    state = restore(ckpt, parts, resume_path, cfg, explicit)
    if cfg.compile and info.enabled:
        log.warning("!!! compile=true is not supported with data-parallel training yet: training eagerly "
                    "(set ddp_procs=1 to compile on one GPU)")
    elif cfg.compile:
        compile_step_model(cfg, parts, comp.task, comp.num_classes, device, preprocess_of(parts.model))
    reserve = new_reserve(cfg, comp, data, parts, build_s)
    if info.is_main:
        measure_reserve(cfg, comp, parts.model, device, reserve)
        if (resume_path is None or explicit) and not ctx.stop.requested:  # a restart may have little time left
            fit_reserve_to_budget(clock, reserve, cfg)
    distributed.main_done(info, clock.start_time + clock.total_s)  # the probe ran on rank 0 alone
    return TrainRun(device, clock, data, parts, state, reserve)


def run_train(ctx: RunContext, comp: Competition, info: DistInfo) -> Outcome:
    run = prepare(ctx, comp, info)
    cfg, device, clock, data, parts = ctx.cfg, run.device, run.clock, run.data, run.parts
    pre = preprocess_of(parts.model)
    log.info("input statistics of %s: mean %s, std %s", cfg.model, pre.mean, pre.std)
    saver = run.saver = Checkpointer(ctx.out_dir, {"config": cfg.to_dict(), "classes": comp.classes, "task": comp.task,
                                       "seed": cfg.seed, "preprocess": pre.to_dict()})
    outcome = Outcome({"train_images": len(data.train_targets), "val_images": len(data.val_targets),
                       "train_start_s": round(clock.elapsed(), 1), "seed": cfg.seed})
    if info.is_main:
        outcome.guard("label statistics", write_label_statistics, comp.train_targets, comp.class_names,
                      comp.train_paths, comp.task, ctx.out_dir)
    ctx.phase = TRAINING
    model = distributed.wrap(parts.model, info)
    trainer = Trainer(dataclasses.replace(parts, model=model), fit_options(cfg, pre, device), clock, run.reserve,
                      device, saver if info.is_main else None, info, ctx.stop, run.state)
    val = (Validation(data.val_loader, data.val_targets, comp.task, prior_baseline(
        comp.task, data.train_targets, data.val_targets, cfg.beta)) if data.val_loader is not None else None)
    if info.enabled:  # a rank that fails must die, so the launcher stops its peers instead of them hanging
        trainer.fit(data.train_loader, val)
    elif outcome.guard("training", trainer.fit, data.train_loader, val) is None:
        trainer.result.stop_reason = "error"  # what was learned before the failure is kept
    distributed.release(info)  # no collective after training: a peer that dies now costs nothing
    result = run.result = trainer.result
    outcome.summary.update(saver.finish())  # every queued checkpoint on disk before anything reads one
    outcome.summary.update(stop_reason=result.stop_reason, epochs=len(result.history), steps=trainer.state.step,
                           warnings=result.warnings,
                           bad_train_images=trainer.state.bad_images, nonfinite_steps=trainer.state.nonfinite_steps,
                           failed_saves=saver.failures, micro_batches=trainer.state.micro_batches,
                           train_end_s=round(clock.elapsed(), 1), session=trainer.state.session,
                           sessions=cfg.sessions, progress=round(trainer.state.progress, 4), swa=result.average,
                           compile=parts.compiled and {"seconds": round(parts.compiled.seconds, 1),
                                                       "error": parts.compiled.error})
    if trainer.state.step == 0:
        log.warning("no training step was taken (%s); predicting with the initial weights", result.stop_reason)
    if info.is_main:
        ctx.phase = PREDICTING
        finish(ctx, comp, run, outcome)
    return outcome


def finish(ctx: RunContext, comp: Competition, run: TrainRun, outcome: Outcome) -> None:
    """Rule, prediction and submission, the inference weights, then the reports; each step guarded, so a
    failing one costs only itself."""
    cfg, settings, data, result, saver = ctx.cfg, RuleSettings.of(ctx.cfg), run.data, run.result, run.saver
    outcome.guard("writing history.csv", write_history, result.history, ctx.out_dir)
    rule = settings.global_rule(result.state.threshold)
    if comp.task == "multilabel":
        rule = outcome.guard("threshold rule search", refine_rule, settings, result.state.threshold,
                             comp.class_names, data.val_targets, result.best_val_probs) or rule
        if rule.kind != "global":  # stored so offline inference decodes the same way
            saver.update(BEST, threshold_rule=rule.to_dict())
    outcome.summary["threshold_rule"] = rule.to_dict() if comp.task == "multilabel" else None
    if len(data.val_targets):
        outcome.summary["baseline"] = outcome.guard("baseline", prior_baseline, comp.task, data.train_targets,
                                                    data.val_targets, cfg.beta)
    submit(ctx, comp, run, rule, outcome)
    # The inference weights have their seconds in the reserve; the reports come after them, on what is
    # left: they are not reserved (the history plot alone took ~2 s on the GPU rows), and before this
    # order they used up the export's seconds on every short GPU run.
    finish_outputs(ctx, saver, outcome, run.clock)
    outcome.guard("validation reports", validation_reports, cfg, comp, data, result, rule, ctx.out_dir, outcome)


def predictor_in_memory(model: torch.nn.Module, cfg: Config, comp: Competition, rule: ThresholdRule,
                        device: torch.device) -> Predictor:
    model.to(device).eval()
    return Predictor("in-memory model", model, cfg, comp.task, comp.classes, rule, preprocess=preprocess_of(model))


def submit(ctx: RunContext, comp: Competition, run: TrainRun, rule: ThresholdRule, outcome: Outcome) -> None:
    """Predict with the best checkpoint; should that fail, with last.pt, then with the model in memory."""
    cfg, saver, clock, reserve, device = ctx.cfg, run.saver, run.clock, run.reserve, run.device
    for path in prediction_sources(saver.out_dir) + [None]:
        if path is None:
            pred = predictor_in_memory(run.parts.model, cfg, comp, rule, device)
        else:
            pred = outcome.guard(f"loading {path.name}", load_predictor, path, device, RuleSettings.of(cfg),
                                 cfg.channels_last)
        if pred is None:
            continue
        if comp.task == "multilabel" and path in (None, saver.path(BEST)):
            pred.rule = rule  # decided on this checkpoint's validation probabilities just now
        tta = plan_tta(cfg.tta, len(comp.test_ids), reserve.test_ips or reserve.val_ips,
                       clock.remaining() - reserve.startup_s, ctx.stop, parse_duration(cfg.grace))
        out = outcome.guard(f"prediction with {pred.name}", predict_test, pred, comp, cfg, device, tta, ctx.stop)
        if out is None and clock.remaining() <= 0:
            log.error("no time left to try another model after the failed prediction")
            return
        if out is None:
            continue
        if outcome.guard("writing the submission", write_predictions, comp, out["probs"], out["ok"], comp.task,
                         pred.rule, ctx.out_dir) is not None:
            outcome.submitted = True
            outcome.summary.update(checkpoint=path.name if path else pred.name, val_score=pred.val_score, tta=tta,
                                   infer_images_per_s=round(out["images_per_s"], 1),
                                   submitted_at_s=round(clock.elapsed(), 1))
            return
''',
'kernelkit.app.train_reports': r'''"""What a train run leaves beside its submission: history.csv and its plot, the best epoch's
validation probabilities and error analysis, the out-of-fold file under K-fold."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..core.config import Config
from ..core.fileio import atomic_write, write_npy
from ..data.folds import save_oof
from ..decide.reports import plot_history, write_error_analysis
from ..decide.thresholds import ThresholdRule
from ..engine.trainer import FitResult
from ..inputs.competition import Competition


def write_history(history: list[dict], out_dir: Path) -> None:
    if history:
        atomic_write(out_dir / "history.csv", pd.DataFrame(history).to_csv(index=False))


def validation_reports(cfg: Config, comp: Competition, data, result: FitResult, rule: ThresholdRule,
                       out_dir: Path, outcome) -> None:
    """Curves, per-label errors and worst images of the best epoch; its out-of-fold file under K-fold."""
    metric = f"F{cfg.beta:g} per image" if comp.task == "multilabel" else "accuracy"
    if (out_dir / "history.csv").is_file():
        outcome.guard("history plot", plot_history, out_dir / "history.csv", out_dir / "history.png", metric=metric)
    probs = result.best_val_probs
    if probs is None or probs.shape[0] != len(data.val_targets):
        return
    write_npy(out_dir / "val_probs.npy", probs)
    val_pred = rule.apply(probs) if comp.task == "multilabel" else probs.argmax(1)
    outcome.summary["errors"] = outcome.guard("error analysis", write_error_analysis, data.val_targets, val_pred,
                                              probs, comp.class_names, [Path(p).stem for p in data.val_paths], out_dir)
    if cfg.fold >= 0:
        save_oof(out_dir / "oof", cfg.fold, data.val_rows, probs)
''',
'kernelkit.build': r'''"""Config to objects: the one place that turns a `Config` into data, loaders, model, optimizer and
loss (`assemble`, `components`), the timed choice of model and image size (`autopick`), and the
choice of input mode (pad, or tiles with squeeze as the autopick's fallback) from the images' aspect
ratios (`input_mode`), and of the augmentation level from how much the images are enlarged
(`augmentation`).
Imports from every package below it, never from `app`."""
''',
'kernelkit.build.assemble': r'''"""Config -> the competition (`open_competition`), and config + competition -> the loaders a run needs (the image cache, the split, samplers)."""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core import distributed, env
from ..core.clock import now as clock_now
from ..core.config import Config
from ..core.context import RunContext
from ..core.distributed import DistInfo
from ..core.stopping import StopFlag
from ..core.storage import GB, plan_storage
from ..data.cache import BuildStopped, ImageCache, build_cache, open_cache
from ..data.folds import make_folds
from ..data.loaders import ImageDataset, make_loader, split_indices
from ..data.images import RECT_ASPECTS, column_rows
from ..data.sampling import balanced_sampler, rect_buckets
from ..data.transforms import EvalTransform, TrainTransform
from ..inputs.competition import Competition, load_competition
from ..inputs.submission import check_submission_writable
from .augmentation import auto_augmentation

log = logging.getLogger("kernelkit")

CACHE_WAIT_SLACK_S = 120.0  # past the build's deadline: its abandonment and the index write

def open_competition(ctx: RunContext) -> Competition:
    """The data, and proof that a submission can be written for it, before anything slow runs."""
    cfg = ctx.cfg
    comp = load_competition(ctx.data_dir, cfg.format, id_column=cfg.id_column, label_column=cfg.label_column,
                            train_images=cfg.train_images, test_images=cfg.test_images, image_ext=cfg.image_ext)
    check_submission_writable(comp, ctx.out_dir)
    return comp


def num_workers(cfg: Config, world_size: int = 1) -> int:
    """num_workers as set, or -1: this rank's share of the cores (distributed.cpu_share)."""
    return distributed.cpu_share(env.cpu_count(), world_size) if cfg.num_workers < 0 else cfg.num_workers


@dataclass
class TrainingData:
    train_loader: Any
    val_loader: Any
    train_targets: np.ndarray
    val_targets: np.ndarray
    val_paths: list[str]
    val_rows: np.ndarray  # positions of the validation images in comp.train_paths (for out-of-fold files)
    gpu_aug: str = ""  # the augmentation level that runs on the device over whole batches ('' = none)


def augmentation_split(aug: str, gpu_aug: str, device_type: str, cached: bool) -> tuple[str, str]:
    """-> (per-image level in the loader, batch level on the device).

    gpu_aug='auto': on a GPU with every training image cached, the loader only gathers cached rows
    and `aug` runs on the device over whole batches: measured on an H100 with 4 cores, the per-image
    crop in the loader held training at ~57% of the GPU's speed. On a CPU, or with images decoded
    on the fly (the per-image work is there anyway), `aug` stays per image. An explicit gpu_aug is
    taken as given, alongside `aug`."""
    if gpu_aug != "auto":
        return aug, gpu_aug
    if device_type == "cuda" and cached:
        return "none", "" if aug == "none" else aug
    return aug, ""


def image_cache(cfg: Config, paths: list[str], info: DistInfo = distributed.SINGLE,
                stop: StopFlag | None = None, deadline: float = 0.0) -> ImageCache | None:
    """Decode once at img_size; epochs after the first read uint8 rows. Rank 0 builds (abandoning the
    build past `deadline`: a cache is a speed-up, never worth the run), others open."""
    if not cfg.cache_images or not paths:
        return None
    root = cache_root(cfg)
    geometry = cfg.geometry()
    cache = None
    if info.is_main:
        log.info("image cache: %d images at %d px%s", len(paths), cfg.img_size,
                 " (rank 0; the other ranks wait)" if info.enabled else "")
        try:
            # rank 0 alone: the other ranks wait idle, so it takes every core
            cache = build_cache(paths, geometry, root, num_workers=num_workers(cfg), mp_context=cfg.mp_context,
                                max_bytes=int(cfg.cache_max_gb * 1e9), stop=stop, deadline=deadline)
        except BuildStopped as e:
            log.warning("%s; images will be decoded as they are used", e)
        except OSError as e:  # a full or read-only disk: slower epochs, not a lost run
            log.error("!!! the image cache could not be built (%s); images will be decoded as they are used", e)
    if info.enabled:
        # a store key, not a barrier: the build may outlast any collective timeout
        distributed.main_done(info, deadline + CACHE_WAIT_SLACK_S if deadline else clock_now() + 86400.0)
        if cache is None:
            cache = open_cache(paths, geometry, root)
    return cache


def cache_root(cfg: Config) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else env.default_cache_dir(env.out_dir_for(cfg.out_dir))


def fit_outputs(cfg: Config, comp: Competition, out_dir: Path, n_params: int) -> Config:
    """The config the data is built with: the cache cut to what the output cap and the disk leave
    once the checkpoints are counted. Raises ConfigError when the checkpoints alone do not fit."""
    n_images = min(len(comp.train_paths), cfg.max_train_images or len(comp.train_paths))
    # a cached image is a column of img_size-wide rows: input_tiles() squares, or a rect's packed rows
    squares = column_rows(max(1, cfg.img_size), cfg.geometry()[3]) / max(1, cfg.img_size)
    plan = plan_storage(out_dir, cache_root(cfg), n_params=n_params, ema=cfg.ema > 0,
                        n_images=math.ceil(n_images * squares),
                        n_outputs=3 * (len(comp.test_ids) + n_images) * comp.num_classes, img_size=cfg.img_size,
                        cache_max_gb=cfg.cache_max_gb, cap_gb=env.output_cap_gb(cfg.output_cap_gb))
    log.info(plan.describe())
    if not cfg.cache_images or plan.cache_allowed_bytes >= plan.cache_wanted_bytes:
        return cfg
    if plan.cache_allowed_bytes < 3 * cfg.img_size ** 2:
        log.warning("no room for an image cache under the output cap and free disk: images are decoded every epoch")
        return dataclasses.replace(cfg, cache_images=False)
    return dataclasses.replace(cfg, cache_max_gb=plan.cache_allowed_bytes / GB)


def split(cfg: Config, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (train rows, validation rows): K-fold (iterative stratification for multi-label) or a hold-out."""
    if cfg.fold >= 0:
        folds = make_folds(targets, cfg.n_folds, cfg.seed)
        return np.flatnonzero(folds != cfg.fold), np.flatnonzero(folds == cfg.fold)
    return split_indices(targets, cfg.val_fraction, cfg.seed)


def build_training_data(cfg: Config, comp: Competition, device: torch.device,
                        info: DistInfo = distributed.SINGLE, stop: StopFlag | None = None,
                        cache_deadline: float = 0.0) -> TrainingData:
    nw, pin = num_workers(cfg, info.world_size), device.type == "cuda"
    targets, paths = comp.train_targets, comp.train_paths
    keep = np.arange(len(paths))
    if cfg.max_train_images and len(paths) > cfg.max_train_images:
        keep = np.sort(np.random.default_rng(cfg.seed).permutation(len(paths))[:cfg.max_train_images])
        paths, targets = [paths[i] for i in keep], targets[keep]
    tr_idx, va_idx = split(cfg, targets)
    if len(tr_idx) == 0:
        raise ValueError("no training images found")
    cache = image_cache(cfg, paths, info, stop, cache_deadline)
    *geometry, tiles = cfg.geometry()
    train_cache = cache.subset(tr_idx) if cache else None
    cached = train_cache is not None and train_cache.all_cached()
    # 'auto' is resolved (and logged) by the launcher; a caller building data directly gets the same choice.
    cpu_aug, gpu_aug = augmentation_split(auto_augmentation(cfg, paths)[0], cfg.gpu_aug, device.type, cached)
    if cfg.gpu_aug == "auto" and gpu_aug:
        log.info("augmentation %r runs on the %s over whole batches (the training images are cached: the "
                 "loader only gathers rows)", gpu_aug, device.type)
    train_ds = ImageDataset([paths[i] for i in tr_idx], targets[tr_idx], TrainTransform(*geometry, cpu_aug, tiles),
                            cfg.img_size, cfg.pad_fill, cache=train_cache)
    val_ds = ImageDataset([paths[i] for i in va_idx], targets[va_idx], EvalTransform(*geometry, tiles), cfg.img_size,
                          cfg.pad_fill, cache=cache.subset(va_idx) if cache else None)
    log.info("train %d / validation %d images, %d workers, device %s", len(train_ds), len(val_ds), nw, device)
    # rank 0 reads the headers and the others take its answer: a header one rank alone failed to read
    # would give the ranks different batch counts, and a collective would wait forever
    buckets = distributed.broadcast_object(info, image_buckets(cfg, paths, "training") if info.is_main else None)
    return TrainingData(
        train_loader=make_loader(train_ds, cfg.batch_size, True, nw, cfg.mp_context, pin, cfg.seed,
                                 train_sampler(cfg, targets[tr_idx], train_ds, info, bucketed=buckets is not None),
                                 buckets=None if buckets is None else buckets[tr_idx],
                                 shard=(info.world_size, info.rank)),
        val_loader=(make_loader(val_ds, cfg.batch_size * 2, False, nw, cfg.mp_context, pin,
                                buckets=None if buckets is None else buckets[va_idx])
                    if len(val_ds) and info.is_main else None),
        train_targets=targets[tr_idx], val_targets=targets[va_idx], val_paths=[paths[i] for i in va_idx],
        val_rows=keep[va_idx], gpu_aug=gpu_aug)


def train_sampler(cfg: Config, targets: np.ndarray, dataset, info: DistInfo, bucketed: bool = False):
    if cfg.balanced_sampling > 0:  # not under DDP: train_job.prepare refuses that combination first
        return balanced_sampler(targets, cfg.balanced_sampling, cfg.seed)
    if info.enabled and bucketed:  # every rank the same shuffle of all images; the loader shards the batches
        return torch.utils.data.DistributedSampler(dataset, 1, 0, shuffle=True, seed=cfg.seed)
    if info.enabled:  # each rank sees its own shard, the same number of batches on every rank
        return torch.utils.data.DistributedSampler(dataset, info.world_size, info.rank, shuffle=True,
                                                   seed=cfg.seed, drop_last=True)
    return None


def test_loader(cfg: Config, comp: Competition, device: torch.device, limit: int = 0):
    """The test images through the eval transform of `cfg` (a checkpoint's own config at inference);
    `limit` > 0: only the first `limit` images (the reserve probe)."""
    paths = comp.test_paths[:limit] if limit else comp.test_paths
    ds = ImageDataset(paths, None, EvalTransform(*cfg.geometry()), cfg.img_size,
                      cfg.pad_fill)
    return make_loader(ds, cfg.batch_size * 2, False, num_workers(cfg), cfg.mp_context, device.type == "cuda",
                       buckets=image_buckets(cfg, paths, "test", quiet=bool(limit)))


def image_buckets(cfg: Config, paths: list[str], what: str, quiet: bool = False) -> np.ndarray | None:
    """input_mode rect: each image's aspect bucket, from its header (batches hold one bucket each); None
    in the other modes."""
    if cfg.input_mode != "rect":
        return None
    t0 = clock_now()
    buckets = rect_buckets(paths)
    if not quiet:
        share = {b: float(np.mean(np.abs(buckets) == b)) for b in range(len(RECT_ASPECTS))}
        log.info("rect: %d %s images by aspect bucket %s, headers read in %.1fs", len(paths), what,
                 "  ".join(f"1:{RECT_ASPECTS[b]:g} {share[b]:.0%}" for b in share if share[b]), clock_now() - t0)
    return buckets
''',
'kernelkit.build.augmentation': r'''"""aug auto -> light, or flip for thumbnails, from the training images' sizes (file headers only).

The random resized crop of `light` keeps up to 40% of a frame out of view and stretches the rest up
to 4:3: objects at any place and scale (photos, iMet's strips) stay in view and the net learns
their scale changes, but where the object *is* the frame it cuts off what tells the classes apart
(the lower stroke of a 9, a 7's foot). Images enlarged autopick.THUMBNAIL_UPSCALE times or more to reach
img_size are that kind: a digit, a glyph, an icon saved at its own small size. Measured fine-tuning
lite0 at 160 px on the 32 px digits (bench/bench_finetune.py, 150 s, test accuracy / F2, one run
each): light 0.981 / 0.982 (0.978 / 0.985 with the crop dropped for the last 30% of the clock),
flip 0.993 / 0.993; on the hard task (64 px frames as tiles at 96 px, 1.5x) light won instead:
0.923 / 0.990 against flip's 0.898 / 0.970. From scratch the digits train at their own 32 px (1x),
where light is the default that measured well.

Thumbnails change one more default: `frozen_stages` auto trains every layer for them
(`resolve_frozen_stages`). Freezing the stem and the stride <= 4 stages with their ImageNet
BatchNorm statistics is right for photos, whose edges and statistics the weights know, and it is
the fine-tune's CPU speed-up; an upscaled 32 px frame is smooth, blocky and grey-levelled unlike any
photo. Measured on the 32 px digits, 6-tag multi-label, lite0 at 96 px for 300 s on 2 cores
(bench/bench_finetune.py, README "Thumbnails train every layer"): every layer trained scored
0.987 / 0.989 test F2 (seeds 0, 1) against 0.983 / 0.982 frozen, and layer_decay 0.75 0.960. At
the autopick's sizes the gain is smaller: training every layer costs 1.4-1.7x a step there.
"""
from __future__ import annotations

import dataclasses
import logging

from ..core.config import Config
from ..core.context import RunContext
from ..core.weights import weights_given
from ..inputs.competition import Competition
from . import autopick
from .input_mode import dry_run, long_share

log = logging.getLogger("kernelkit")


def frame_side(sizes: dict, tiles: int) -> float:
    """The median source side that becomes img_size: the short side in tiles, the long one in a
    padded square (the smaller enlargement of a squeezed image: a crop cuts along both)."""
    return float(sizes.get("short_side_median" if tiles > 1 else "long_side_median") or 0.0)


def choose_augmentation(aug: str, sizes: dict, img_size: int, tiles: int = 0) -> tuple[str, str]:
    """image_sizes(...) of the training images -> (aug level, why). An explicit level is kept."""
    if aug != "auto":
        return aug, "set"
    side = frame_side(sizes, tiles)
    if not side or not img_size:
        return "light", "no readable training image headers"
    upscale = img_size / side
    if autopick.is_thumbnail(side, img_size):
        return "flip", (f"thumbnails: median frame {side:g} px enlarged {upscale:.1f}x to {img_size} px, so the object "
                        f"fills the frame and a random crop would cut it off (aug=light forces the crop)")
    return "light", f"median frame {side:g} px at {img_size} px ({upscale:.1f}x): flip + random resized crop"


def auto_augmentation(cfg: Config, paths: list[str], sizes: dict | None = None) -> tuple[str, str]:
    """cfg.aug, with 'auto' chosen from the headers of (a sample of) `paths`, the sample input_mode reads
    (`sizes`: that sample's statistics, when input_mode read them already)."""
    if cfg.aug != "auto":
        return choose_augmentation(cfg.aug, {}, cfg.img_size, cfg.input_tiles())
    return choose_augmentation(cfg.aug, sizes or long_share(paths, cfg.seed), cfg.img_size, cfg.input_tiles())


def resolve_augmentation(ctx: RunContext, comp: Competition) -> RunContext:
    """`ctx` with a concrete aug level, logged with the reason; after autopick (it needs img_size)."""
    if ctx.cfg.aug != "auto":
        return ctx
    aug, why = auto_augmentation(ctx.cfg, comp.train_paths, ctx.train_image_sizes)
    log.info("augmentation: %s (aug=auto): %s", aug, why)
    return dataclasses.replace(ctx, cfg=dataclasses.replace(ctx.cfg, aug=aug))


def resolve_frozen_stages(ctx: RunContext, comp: Competition, device_type: str) -> RunContext:
    """frozen_stages auto when fine-tuning thumbnails -> 0 (every layer trains), logged with the reason;
    otherwise `ctx` unchanged (auto freezes the high-resolution stages when the model is built).
    Before input_mode and autopick: the value is part of the schedule a checkpoint stores and the
    autopick times. A run that resumes a checkpoint takes the value it trained with (as model auto
    takes its model), not a fresh answer: another device or weights folder would change the ladder."""
    cfg = ctx.cfg
    weights = ctx.weights_found or ()
    if cfg.frozen_stages != -1 or not (weights_given(cfg.pretrained_path) or weights):
        return ctx
    stored = None if dry_run(ctx) else autopick.resumed_config(ctx, comp.classes)  # a dry run plans afresh
    if stored is not None:
        value = int(stored.get("frozen_stages", -1))
        if value != -1:
            log.info("frozen stages: %d (frozen_stages=auto, as the run this one resumes trained)", value)
        return dataclasses.replace(ctx, cfg=dataclasses.replace(cfg, frozen_stages=value))
    sizes = ctx.train_image_sizes or long_share(comp.train_paths, cfg.seed)
    ctx = dataclasses.replace(ctx, train_image_sizes=sizes)
    frame = frame_side(sizes, tiles=1)  # the whole frame's long side: thumbnails in any mode
    if not frame:
        return ctx
    native = int(round(frame))
    smallest = min(c.img_size for c in autopick.candidates(cfg, device_type, native, tuple(weights)))
    if not autopick.is_thumbnail(frame, smallest):
        return ctx
    log.info("frozen stages: none (frozen_stages=auto, fine-tuning): thumbnails, median frame %g px enlarged "
             "%.1fx or more (%d px and up), far from the photos the weights' early layers and their BatchNorm "
             "statistics know, so every layer trains (frozen_stages=N freezes the stem and N stages)",
             frame, smallest / frame, smallest)
    return dataclasses.replace(ctx, cfg=dataclasses.replace(cfg, frozen_stages=0))
''',
'kernelkit.build.autopick': r'''"""model='auto' / img_size=0: the largest (model, input size) of a small ladder that still fits
`auto_min_epochs` epochs in the training time, measured on the machine the run is on.

A network that sees its data ten times beats a bigger one that sees it once: resnet50 at 224 px
fits less than one epoch of a few thousand images in 5 CPU minutes, and a random-init network
after one epoch sits at the label prior. So the ladder is climbed by cost (model GFLOPs x pixels)
and a binary search over it times a few training steps on random tensors per candidate (seconds;
the time is charged to the budget like any other start-up work). Images are never upscaled past
their median size: 28 px digits train at 32, not 224.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..core import distributed
from ..core.accel import amp_dtype
from ..core.clock import now as clock_now
from ..core.config import Config
from ..core.context import RunContext
from ..core.distributed import DistInfo
from ..core.weights import fixed_size_architecture, resolve_weights, same_architecture, weights_given
from ..engine.budget import InferenceReserve, budget_seconds, fmt_seconds
from ..engine.evaluate import autocast
from ..engine.plan import make_plan
from ..engine.resolution import effective_ips, fmt_ips, ips_by_pixels, schedule_from
from ..inputs.competition import Competition

log = logging.getLogger("kernelkit")

# (timm model, GFLOPs at 224 px): the cost that orders the ladder. Tests swap in tiny models.
CPU_MODELS: tuple[tuple[str, float], ...] = (("resnet10t", 1.1), ("resnet18", 1.8), ("resnet34", 3.6))
GPU_MODELS: tuple[tuple[str, float], ...] = (("resnet18", 1.8), ("resnet34", 3.6), ("resnet50", 4.1),
                                             ("convnext_tiny", 4.5))
CPU_SIZES: tuple[int, ...] = (32, 48, 64, 96, 128, 160, 192, 224)
# A fine-tune's ladder is one net over sizes, so each rung is a whole cost step: 96 -> 128 px costs 1.78x,
# and a pick that missed 128 by a few percent of its estimate fell back to 96 px with twice the epochs
# it needed (slow-day digits: 13-14 epochs at 96 px, 0.985 F2, where 128 px ran 7 and the peer's 128 px
# 0.990). The half-steps keep every step under 1.6x. From-scratch ladders interleave three models, which
# already makes their steps small. The rungs under FINETUNE_FLOOR serve thumbnails and weights trained below it.
CPU_FINETUNE_SIZES: tuple[int, ...] = (64, 80, 96, 112, 128, 144, 160, 192, 224)
GPU_SIZES: tuple[int, ...] = (32, 48, 64, 96, 128, 160, 192, 224, 256, 288, 320)
SIZE_FLOOR = {"cpu": 64, "cuda": 128}  # smallest size tried for images at least this large
# A fine-tune's smallest size on either device (when its weights were trained at least this large),
# for images that are not thumbnails at it. Below it a CPU's extra epochs do not pay for what a small
# input throws away: on the hard 1:5 strips (2026-12-05, bench_finetune.py, 300 s, seeds 0 / 1) squeeze
# at 128 px ran 5 epochs and scored 0.923 / 0.933 accuracy and 0.751 / 0.780 F2, where the 64 px floor
# let auto take 80 px for 8-9 epochs: 0.877 / 0.807 and 0.747 / 0.698; with the floor, seeds 0-2 of the
# same day beat the peer notebook on both (README). Thumbnails keep the device's floor: a 32 px digit
# has nothing more to show at 128 px than at 80, and the epochs matter more there (at the floor the
# digits trained 2-4 epochs and scored 0.965 / 0.950 single-label, where 80 px had trained 7: 0.976 / 0.965).
FINETUNE_FLOOR = 128
THUMBNAIL_UPSCALE = 2.0  # img_size / the side of the frame that maps onto it, from which a crop cuts the object


def is_thumbnail(frame_side: float, img_size: int) -> bool:
    """Whether frames of median side `frame_side` are enlarged THUMBNAIL_UPSCALE times or more at `img_size`:
    a digit, a glyph, an icon saved at its own small size, the object filling the frame."""
    return frame_side > 0 and img_size >= THUMBNAIL_UPSCALE * frame_side

DEFAULT_NATIVE = 224  # when no image header could be read
MEASURE_SHARE = 0.05  # of the budget that measuring may take (at least MEASURE_MIN_S)
MEASURE_MIN_S = 15.0
TIMED_STEPS = 3  # after one warm-up step (lazy init, cudnn autotune)
# A full batch of a pretrained net at 128-224 px takes seconds a step on a CPU: time smaller batches
# there (GPUs need the real batch size).
CPU_TIMED_BATCH = 8
# ... but a step also has a fixed cost, which 8 small images do not cover: lite0 ran 1.47-1.53x faster
# per image at 32 images than at 8 at 96 px, 1.16-1.66x at 128 and 1.1-1.27x at 160 (two sessions of
# bench/bench_autopick_timing.py), so the small rungs of a fine-tune's ladder looked slower than they
# train, against the large ones. A fine-tune times at least CPU_TIMED_PIXELS a step (8 images at 160 px,
# 22 at 96 px; 64 px is capped at the batch size, 32): from 80 to 160 px every rung carries the same share
# of the fixed cost. The fine-tuning target (4 epochs) and the pipeline factor were kept: they were set
# against the large rungs, where little changes (bench_finetune.py runs in the README). From-scratch
# ladders keep 8 images: their target (10) and factor were measured with it, and their picks across
# models are what those measurements settled.
CPU_TIMED_PIXELS = 8 * 160 * 160
# Random tensors on the device skip decoding and augmentation; the loader workers share the CPU
# with the model on a CPU-only machine, so real epochs run slower than the bare steps. 0.6 is low for
# cached fine-tunes (lite0 on 1-2 cores ran 0.64-1.0 of the bare rate timed at 8 images, and 8-10 epochs where 4-6 were
# estimated), but 0.85 moved the from-scratch pick on the hard single-label task from resnet10t to
# resnet18, which fell from 0.947 to 0.330 test accuracy in the same 150 s (bench_finetune.py): the
# ladder's cost order does not rank quality there, so the factor stays until the ladder does.
PIPELINE_FACTOR = {"cpu": 0.6, "cuda": 0.8}
SETUP_AFTER_S = 10.0  # still to come after the pick: data loaders, cache build, model, inference probe
SIZE_SAMPLE = 200  # image headers read for the median size


@dataclass(frozen=True)
class Candidate:
    model: str
    img_size: int
    cost: float  # GFLOPs per image, forward
    weights: str = ""  # the attached weights folder this candidate fine-tunes ('' = the config's)

    def __str__(self) -> str:
        return f"{self.model} @ {self.img_size} px" + (f" ({Path(self.weights).name})" if self.weights else "")


@dataclass
class Trial:
    candidate: Candidate
    train_ips: float = 0.0
    infer_ips: float = 0.0
    epochs: float = -1.0
    note: str = ""
    stage_ips: dict | None = None  # progressive resizing: training images/s at each stage size
    floor: bool = False  # at the smallest of the ladder's several sizes: the pick could not climb it at all
    lowest: bool = False  # at the smallest size the autopick would try for this net (sizes not pinned)


def model_cost(name: str) -> float:
    known = dict(CPU_MODELS + GPU_MODELS)
    return known.get(name, 4.0)


def ladder(device_type: str, native_size: int | None, model: str = "", img_size: int = 0,
           weights_size: int = 0) -> list[Candidate]:
    """Candidates cheapest first. An explicit model or size pins that axis; the sizes stop at the
    first ladder size that reaches the images' native size (no upscaling beyond it). Pretrained
    weights (`weights_size`: the input size they were trained at) move the range to [a quarter of
    that size, at least FINETUNE_FLOOR (the device's floor for thumbnails at it) but not above the
    weights' own size (nor below the device's floor on large images); the larger of it and the
    images' size]: their features are tuned to objects of that scale, so small images are upscaled
    towards it as far as the epochs allow (at 32 px a pretrained net wastes them); on a CPU in the
    half-steps of CPU_FINETUNE_SIZES."""
    models = GPU_MODELS if device_type == "cuda" else CPU_MODELS
    sizes = GPU_SIZES if device_type == "cuda" else (CPU_FINETUNE_SIZES if weights_size else CPU_SIZES)
    if model:
        models = ((model, model_cost(model)),)
    if img_size:
        sizes = (img_size,)
    else:
        reach = [s for s in sizes if s >= (native_size or DEFAULT_NATIVE)]
        cap = reach[0] if reach else sizes[-1]
        floor = min(cap, SIZE_FLOOR.get(device_type, sizes[0]))  # 32 px of a 500 px photo keeps nothing
        if weights_size:
            up = [s for s in sizes if s >= weights_size]
            cap = max(cap, up[0] if up else sizes[-1])
            thumbnails = is_thumbnail(native_size or 0, FINETUNE_FLOOR)
            least = SIZE_FLOOR.get(device_type, sizes[0]) if thumbnails else FINETUNE_FLOOR
            lowest = min(weights_size, max(weights_size / 4, least))  # never above the weights' own
            floor = max(floor, next((s for s in sizes if s >= lowest), cap))  # ... nor below the device's
        sizes = tuple(s for s in sizes if floor <= s <= cap)
    cands = [Candidate(m, s, gflops * (s / 224) ** 2) for m, gflops in models for s in sizes]
    return sorted(cands, key=lambda c: (c.cost, c.img_size))


def pick(cands: list[Candidate], epochs_of: Callable[[Candidate], float], need: float) -> tuple[Candidate, dict]:
    """The costliest candidate with epochs_of(c) >= need, by binary search over the cost order
    (epochs fall as cost rises); when none fits, the one measured with the most epochs (nominal
    GFLOPs do not always rank CPU speed: a deep stem is slow there). -> (choice, {candidate: epochs})."""
    seen: dict[Candidate, float] = {}

    def epochs(i: int) -> float:
        if cands[i] not in seen:
            seen[cands[i]] = epochs_of(cands[i])
        return seen[cands[i]]

    lo, hi, best = 0, len(cands) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if epochs(mid) >= need:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    if best is None:
        epochs(0)
        return max(seen, key=lambda c: (seen[c], -c.cost)), seen
    return cands[best], seen


def measure(cand: Candidate, cfg: Config, num_classes: int, device: torch.device,
            steps: int = TIMED_STEPS, deadline: float = float("inf")) -> tuple[float, float]:
    """-> (training images/s, inference images/s) of `cand` on random tensors at the run's batch size (on a CPU
    fewer: cpu_timed_images). In tiles mode each image is `tiles` squares, so the timed batch is
    that many squares, as training's is: a batch of 8 small squares runs a CPU far below the rate of
    the 3 x 32 that training feeds it (measured 66 against 105 images/s at tiles x3, 64 px), and
    dividing a square rate by the tile count afterwards kept the pretrained net at its smallest size.
    Past `deadline` only one timed step and one timed batch are taken (a slow rung must not eat the budget)."""
    from ..model.factory import create_optimizer, freeze_early, hold_frozen_norms
    from .components import frozen_stages, model_from_config
    model = model_from_config(dataclasses.replace(cfg, model=cand.model, img_size=cand.img_size), num_classes,
                              with_weights=False).to(device)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    weights = cand.weights or cfg.pretrained_path  # the candidate's own folder counts as weights given
    freeze_early(model, frozen_stages(dataclasses.replace(cfg, pretrained_path=weights)))  # as training will
    opt = create_optimizer(model, 1e-5, cfg.weight_decay)  # what training steps with (fused AdamW on a GPU)
    tiles = cfg.input_tiles()
    n = cfg.batch_size if device.type == "cuda" else cpu_timed_images(cand.img_size, tiles, cfg.batch_size,
                                                                       weights_given(weights))
    x = torch.randn(n * tiles, 3, cand.img_size, cand.img_size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (n * tiles,), device=device)
    model.train()
    hold_frozen_norms(model)
    dtype = amp_dtype(cfg.amp_dtype, device)
    times = []
    for _ in range(steps + 1):
        t0 = _now(device)
        with autocast(device, cfg.amp, dtype):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(_now(device) - t0)
        if len(times) >= 2 and clock_now() > deadline:
            break
    # The fastest step, as timeit does: on a shared machine the others carry other processes' load,
    # which would rank the candidates by the noise rather than by their cost.
    train_ips = n / max(min(times[1:]), 1e-9)
    model.eval()
    xi = torch.cat([x, x]).contiguous(memory_format=fmt)  # inference batches are twice the training batch
    times = []
    with torch.no_grad(), autocast(device, cfg.amp, dtype):
        for _ in range(3):
            t0 = _now(device)
            model(xi)
            times.append(_now(device) - t0)
            if len(times) >= 2 and clock_now() > deadline:
                break
    infer_ips = len(xi) / tiles / max(min(times[1:]), 1e-9)
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return train_ips, infer_ips


def cpu_timed_images(img_size: int, tiles: int, batch_size: int, fine_tune: bool) -> int:
    """Images per timed step on a CPU: CPU_TIMED_BATCH, or for a fine-tune enough for CPU_TIMED_PIXELS
    (never more than the batch training runs). The inference batch follows (2x): at 22-32 images it is
    nearer the 64 that prediction runs than 16 were."""
    n = CPU_TIMED_BATCH
    if fine_tune:
        n = max(n, math.ceil(CPU_TIMED_PIXELS / (img_size * img_size * tiles)))
    return max(1, min(batch_size, n))


def stage_throughput(cand: Candidate, cfg: Config, num_classes: int, device: torch.device, deadline: float,
                     full_ips: float) -> dict[int, float] | None:
    """Progressive resizing: training images/s at each stage size of `cand`'s schedule, from one
    more measurement at the smallest stage (time per image linear in the pixel count between the
    two); None when the option is off or leaves a single size."""
    sched = schedule_from(cand.img_size, cfg.resize_start, cfg.resize_full_at)
    if sched is None:
        return None
    small = min(sched.sizes())
    try:
        small_ips, _ = measure(dataclasses.replace(cand, img_size=small), cfg, num_classes, device, deadline=deadline)
    except Exception as e:  # noqa: BLE001  (a fixed-size ViT: training will run at img_size throughout)
        log.info("autopick: %s not timed at %d px (%s): planned at full size", cand, small, type(e).__name__)
        return None
    return ips_by_pixels(sorted(set(sched.sizes())), {small: small_ips, cand.img_size: full_ips})


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock_now()


def native_size(paths: list[str], seed: int = 0, short: bool = False) -> int | None:
    """Median long side of a sample of the training images (headers only); None if none are readable.
    short: the median short side (tiles mode: img_size is the short side's)."""
    from ..decide.reports import image_sizes
    sizes = image_sizes(paths, SIZE_SAMPLE, seed, 2.0)
    if "width" not in sizes:
        return None
    # Each image's long side, then the median: max(median width, median height) reads 64 for 32 x 96 strips
    # in both orientations.
    return int(round(sizes["short_side_median" if short else "long_side_median"]))


@dataclass
class RunShape:
    """What an epoch and the final inference cost in images, and the time there is for them."""
    n_train: int
    n_val: int
    n_test: int
    tta: int
    budget_s: float
    margin_s: float
    world_size: int = 1

    @classmethod
    def of(cls, cfg: Config, comp: Competition, world_size: int = 1) -> "RunShape":
        n = len(comp.train_targets)
        if cfg.max_train_images:
            n = min(n, cfg.max_train_images)
        val_share = 1.0 / cfg.n_folds if cfg.fold >= 0 else cfg.val_fraction
        n_val = int(round(n * val_share))
        return cls(n - n_val, n_val, len(comp.test_ids), cfg.tta, *budget_seconds(cfg), world_size)

    def epochs(self, train_ips: float, infer_ips: float, setup_s: float, pipeline: float) -> float:
        reserve = InferenceReserve.measured(self.n_test, self.n_val, self.tta, infer_ips * pipeline, 3.0)
        plan = make_plan(budget_s=self.budget_s, margin_s=self.margin_s, setup_s=setup_s,
                         train_ips=train_ips * pipeline * self.world_size, reserve=reserve, n_train=self.n_train)
        return plan.epochs_that_fit


def candidates(cfg: Config, device_type: str, native: int | None, weights: tuple[Path, ...] = ()) -> list[Candidate]:
    """The ladder of the configured model (or of each of several attached weights folders), cheapest first."""
    if len(weights) < 2:
        return ladder(device_type, native, "" if cfg.model == "auto" else cfg.model, cfg.img_size,
                      weights_input_size(cfg.pretrained_path))
    cands = []
    for folder in weights:
        src = resolve_weights(folder)
        cands += [dataclasses.replace(c, weights=str(folder)) for c in
                  ladder(device_type, native, src.architecture, cfg.img_size, weights_input_size(str(folder)))]
    return sorted(cands, key=lambda c: (c.cost, c.img_size))


def choose(cfg: Config, comp: Competition, device: torch.device, shape: RunShape, started_at: float,
           every: bool = False, stop=None, weights: tuple[Path, ...] = ()) -> tuple[Candidate, list[Trial]]:
    """Measure and pick; `every`: time the whole ladder (the dry run prints it); `weights`: several
    attached weights folders, ranked on one ladder. The device is tuned and seeded first
    (cudnn.benchmark, TF32; under `deterministic` CUBLAS_WORKSPACE_CONFIG, which cuBLAS reads once,
    when the first measurement starts it), so it is measured as it will train."""
    from .components import ready_device
    ready_device(cfg, device)
    # tiles mode: img_size is the short side's (measure times each image as its tiles)
    native = None if cfg.img_size else native_size(comp.train_paths, cfg.seed, short=cfg.input_tiles() > 1)
    cands = candidates(cfg, device.type, native, weights)
    log.info("autopick: %d candidate(s) on %s (median image size %s px, %d training images), want >= %d epochs",
             len(cands), device.type, native or "unknown", shape.n_train, need_epochs(cfg))
    deadline = clock_now() + max(MEASURE_MIN_S, MEASURE_SHARE * shape.budget_s)
    trials: dict[Candidate, Trial] = {}

    def epochs_of(c: Candidate) -> float:
        t = trials.setdefault(c, Trial(c))
        if t.train_ips or t.note:  # measured (or given up on) already: before the search, or in the dry run's pass
            return t.epochs
        if clock_now() > deadline or (stop is not None and stop.requested):
            t.note = "not measured (time for measuring is up)"
            return -1.0
        try:
            t.train_ips, t.infer_ips = measure(c, cfg, comp.num_classes, device, deadline=deadline)  # per image
            t.stage_ips = stage_throughput(c, cfg, comp.num_classes, device, deadline, t.train_ips)
        except Exception as e:  # noqa: BLE001  (out of memory, a model timm cannot build at this size)
            t.note = f"failed: {type(e).__name__}: {str(e)[:120]}"
            return -1.0
        setup_s = clock_now() - started_at + SETUP_AFTER_S
        sched = schedule_from(c.img_size, cfg.resize_start, cfg.resize_full_at)
        train_ips = t.train_ips if t.stage_ips is None else effective_ips(t.stage_ips, sched, not cfg.epochs)
        t.epochs = shape.epochs(train_ips, t.infer_ips, setup_s, PIPELINE_FACTOR.get(device.type, 0.8))
        log.info("autopick: %-24s %8.1f img/s train %8.1f img/s inference -> %.1f epochs%s", c, t.train_ips,
                 t.infer_ips, t.epochs, f" (progressive resizing: {fmt_ips(t.stage_ips)})" if t.stage_ips else "")
        return t.epochs

    if every:
        for c in cands:
            epochs_of(c)
    one_net = weights_given(cfg.pretrained_path) and len(weights) < 2
    if one_net and not every and 0 <= epochs_of(cands[0]) < need_epochs(cfg):
        # One architecture, sizes only: when the smallest size the weights allow does not fit, no larger
        # one does, and timing a larger one (a slow step on a CPU) would only spend the budget.
        choice = cands[0]
    else:
        choice, _ = pick(cands, epochs_of, need_epochs(cfg))
    sizes = {c.img_size for c in cands}
    for t in trials.values():  # a pick at the smallest of several sizes could not enlarge the objects at all
        t.floor = len(sizes) > 1 and t.candidate.img_size == min(sizes)
        own = [c.img_size for c in cands if (c.model, c.weights) == (t.candidate.model, t.candidate.weights)]
        t.lowest = not cfg.img_size and t.candidate.img_size == min(own)
    return choice, [trials[c] for c in cands if c in trials]


def weights_input_size(path: str) -> int:
    """The input size pretrained weights were trained at (their config.json's pretrained_cfg), 0 without
    weights; DEFAULT_NATIVE for a bare file, which does not say."""
    if not weights_given(path):
        return 0
    try:
        size = resolve_weights(path).pretrained_cfg.get("input_size")
        return int(size[-1]) if size else DEFAULT_NATIVE
    except (ValueError, TypeError, IndexError):
        return DEFAULT_NATIVE


def need_epochs(cfg: Config) -> int:
    return cfg.epochs or cfg.auto_min_epochs


def ladder_table(trials: list[Trial], choice: Candidate, need: int) -> str:
    rows = [f"  {'model @ size':<28} {'train img/s':>11} {'infer img/s':>11} {'epochs':>7}"]
    for t in trials:
        mark = "  <- chosen" if t.candidate == choice else ("" if t.epochs >= need else "  (too slow)")
        if t.note:
            rows.append(f"  {str(t.candidate):<28} {t.note}")
        else:
            rows.append(f"  {str(t.candidate):<28} {t.train_ips:>11.1f} {t.infer_ips:>11.1f} {t.epochs:>7.1f}{mark}")
    return "\n".join(rows)


@dataclass(frozen=True)
class Choice:
    """What autopick decides: the checkpoints store it (in the config), and a resumed run takes it back."""
    model: str
    img_size: int
    weights: str = ""  # the attached weights folder ('' = the config's pretrained_path)
    input_mode: str = ""  # '' = as resolved before the pick (the fallback from tiles sets 'squeeze')
    tiles: int = 0


def resumed_config(ctx: RunContext, classes: list) -> dict | None:
    """The config saved in the checkpoint this run will resume (what auto resolved to there); None when it
    resumes none, or when resume.check_resume will refuse it or start fresh (another model, label set or
    schedule), or when the file is unreadable (prepare reports that properly)."""
    from ..engine.checkpoint import load_checkpoint
    from ..engine.resume import continues
    from ..engine.run_state import resumable
    try:
        path = resumable(ctx.out_dir, ctx.cfg.resume) or (Path(ctx.cfg.resume_from) if ctx.cfg.resume_from else None)
        if path is None:
            return None
        ckpt = load_checkpoint(path, "cpu", mmap=True)  # resume.check_resume loads it all
        stored = ckpt.get("config", {})
        # model auto is resolved after this: the run resumes whichever model the checkpoint trained;
        # so does frozen_stages auto (what the thumbnail rule resolved it to there)
        model = stored.get("model") if ctx.cfg.model == "auto" else ctx.cfg.model
        frozen = int(stored.get("frozen_stages", -1)) if ctx.cfg.frozen_stages == -1 else ctx.cfg.frozen_stages
        return stored if continues(ckpt, dataclasses.replace(ctx.cfg, model=model, frozen_stages=frozen),
                                   classes) else None
    except Exception as e:  # noqa: BLE001
        log.warning("could not read the config of the run to resume in %s (%s)", ctx.out_dir, e)
        return None


def stored_choice(ctx: RunContext, classes: list) -> Choice | None:
    """The model and size of the run this one will resume (its input mode: input_mode.resolve_input_mode)."""
    stored = resumed_config(ctx, classes)
    try:
        return Choice(str(stored["model"]), int(stored["img_size"])) if stored else None
    except (KeyError, TypeError, ValueError) as e:
        log.warning("autopick: the resumed checkpoint names no model and size (%s); measuring", e)
        return None


def measures(ctx: RunContext) -> bool:
    """Whether `resolve` will pick anything: model or img_size auto, or several attached weights folders."""
    return ctx.cfg.model == "auto" or not ctx.cfg.img_size or len(ctx.weights_found or ()) > 1


def resolve(ctx: RunContext, comp: Competition, info: DistInfo, every: bool = False) -> RunContext:
    """`ctx` with a concrete model and img_size (what checkpoints store), and the input mode when the
    autopick took the tiles' fallback; unchanged when
    `measures(ctx)` is False.
    Rank 0 measures, the other ranks take its choice."""
    cfg = ctx.cfg
    several = len(ctx.weights_found or ()) > 1
    if not measures(ctx):
        return ctx
    choice = None
    if info.is_main:
        choice = _choose_main(ctx, comp, info, every)
    # The others wait on a store key, not in the broadcast: measuring may outlast a collective timeout.
    distributed.main_done(info, ctx.t_start + budget_seconds(cfg)[0])
    choice = distributed.broadcast_object(info, choice)
    if several:  # the model came from the first folder found, not from the user
        model, path = choice.model, choice.weights or cfg.pretrained_path
    else:  # explicit settings win
        model, path = choice.model if cfg.model == "auto" else cfg.model, cfg.pretrained_path
    mode = {"input_mode": choice.input_mode, "tiles": choice.tiles} if choice.input_mode else {}
    if several and cfg.input_mode == "rect" and fixed_size_architecture(model):
        # auto chose rect for the first folder's architecture; this one takes only its own input size
        log.info("input mode: pad instead of rect (%s takes only its own input size)", model)
        mode = {"input_mode": "pad", "tiles": 0}
    picked = dataclasses.replace(cfg, model=model, img_size=cfg.img_size or choice.img_size, pretrained_path=path,
                                 **mode)
    resolved = dataclasses.replace(ctx, cfg=picked, input_mode_fallback="")
    if info.is_main:
        try:
            resolved.cfg.save(ctx.out_dir / "config.json")
        except Exception as e:  # noqa: BLE001  (the log has the choice)
            log.error("!!! could not rewrite config.json (%s)", e)
    return resolved


def _choose_main(ctx: RunContext, comp: Competition, info: DistInfo, every: bool) -> Choice:
    cfg = ctx.cfg
    weights = ctx.weights_found or ()
    stored = None if every else stored_choice(ctx, comp.classes)
    if stored is not None:
        log.info("autopick: resuming a run that picked %s @ %d px", stored.model, stored.img_size)
        same = [str(w) for w in weights if len(weights) > 1 and
                same_architecture(resolve_weights(w).architecture, stored.model)]
        return dataclasses.replace(stored, weights=same[0] if same else "")
    shape = RunShape.of(cfg, comp, info.world_size)
    several = weights if len(weights) > 1 else ()
    choice, got = _measured_choice(cfg, comp, info, shape, ctx, every, several)
    need = need_epochs(cfg)
    # The floor counts where it was measured to lose: far below the weights' input size (64 px for 224 px
    # weights on a CPU, where short sides that are thumbnails at FINETUNE_FLOOR start the tiles' ladder).
    low = got.floor and choice.img_size < weights_input_size(choice.weights or cfg.pretrained_path) / 2
    if ctx.input_mode_fallback and (low or not fits(got, need)):
        if got.note:
            why = f"the tiles were not measured ({got.note})"
        elif fits(got, need):
            why = (f"the tiles fit {need} epochs only at the smallest size ({choice.img_size} px), where a pretrained "
                   "net wastes its features")
        else:
            why = "the tiles fit too few epochs"
        log.info("autopick: input mode %s instead of tiles x%d: %s (each image costs %d squares); measuring one "
                 "square per image", ctx.input_mode_fallback, cfg.input_tiles(), why, cfg.input_tiles())
        tiles_choice = choice
        squeeze = dataclasses.replace(cfg, input_mode=ctx.input_mode_fallback, tiles=0)
        choice, square = _measured_choice(squeeze, comp, info, shape, ctx, every, several)
        # One square starts at FINETUNE_FLOOR where thumbnail-sized short sides start the tiles lower: at
        # the floor it wins with fewer epochs than wanted (size beat epochs on the strips), not with under half.
        too_few = not fits(square, need / 2)
        if fits(got, need) and (too_few or choice.img_size <= tiles_choice.img_size):
            log.info("autopick: keeping tiles x%d at %d px: one square per image fits %s", cfg.input_tiles(),
                     tiles_choice.img_size, "under half the epochs" if too_few else "no larger size")
            return Choice(tiles_choice.model, tiles_choice.img_size, tiles_choice.weights)
        return Choice(choice.model, choice.img_size, choice.weights, squeeze.input_mode, 0)
    return Choice(choice.model, choice.img_size, choice.weights)


def fits(trial: Trial, need: float) -> bool:
    return not trial.note and trial.epochs >= need


def _measured_choice(cfg: Config, comp: Competition, info: DistInfo, shape: RunShape, ctx: RunContext, every: bool,
                     several: tuple[Path, ...]) -> tuple[Candidate, Trial]:
    """choose(), logged: the ladder's table and the verdict. -> (choice, its trial)."""
    t0 = clock_now()
    choice, trials = choose(cfg, comp, info.device(), shape, ctx.t_start, every, ctx.stop, several)
    need = need_epochs(cfg)
    got = next(t for t in trials if t.candidate == choice)
    log.info("autopick: ladder (%s of measuring):\n%s", fmt_seconds(clock_now() - t0),
             ladder_table(trials, choice, need))
    if got.note:
        verdict = f"the cheapest, {got.note}"
    elif got.epochs < need and ctx.input_mode_fallback and cfg.input_mode == "tiles":
        verdict = f"~{got.epochs:.1f} epochs, want >= {need}: none measured fits them"
    elif 1 <= got.epochs < need and got.lowest and weights_input_size(choice.weights or cfg.pretrained_path):
        verdict = (f"~{got.epochs:.1f} epochs, want >= {need}: fewer, at the smallest size this fine-tune takes "
                   "(below it the pretrained features go to waste)")
    elif got.epochs < need:
        verdict = f"~{got.epochs:.1f} epochs, want >= {need} -- WARNING: none measured fits them; the most epochs"
    else:
        verdict = f"~{got.epochs:.1f} epochs, want >= {need}"
    log.info("autopick: chose %s (%s)", choice, verdict)
    return choice, got

''',
'kernelkit.build.components': r'''"""Config -> the training parts: model, optimizer, scaler, loss, EMA, batch augmentation, and the
seeds that make two runs with one seed give the same result."""
from __future__ import annotations

import functools
import logging
import os
import random

import numpy as np
import torch

from ..core import accel
from ..core.config import Config, parse_duration, parse_kwargs
from ..core.weights import weights_given
from ..data.transforms import BatchAugment, Preprocess, normalize, seed_augmentations
from ..engine.evaluate import autocast
from ..engine.learning_check import likely_causes
from ..engine.resolution import fixed_input_size, schedule_from
from ..engine.swa import create_averager
from ..engine.trainer import FitOptions, TrainParts
from ..model.factory import (
    HIGH_RESOLUTION,
    bucket_norms,
    build_model,
    create_ema,
    create_optimizer,
    freeze_early,
    hold_frozen_norms,
)
from ..model.losses import get_loss

log = logging.getLogger("kernelkit")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Python, NumPy, torch (CPU and every CUDA device) and the augmentation streams; loader workers
    derive theirs from the loader's seeded generator (data.seed_worker). On CPU that is enough for
    identical runs; on GPU `deterministic` also picks deterministic kernels (slower)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too
    seed_augmentations(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def ready_device(cfg: Config, device: torch.device, rank: int = 0) -> None:
    """Seeds and accelerator settings, before anything runs on the device (autopick measures first):
    cuBLAS reads CUBLAS_WORKSPACE_CONFIG once, when it starts, and a measurement without
    cudnn.benchmark and TF32 underrates what training will reach."""
    seed_everything(cfg.seed + rank, cfg.deterministic)
    accel.tune(device, cfg.deterministic)


def model_from_config(cfg: Config, num_classes: int, with_weights: bool = True) -> torch.nn.Module:
    """The architecture a config describes; `with_weights=False` when a checkpoint will fill it. Rect
    runs keep BatchNorm statistics per aspect bucket (factory.bucket_norms)."""
    model = build_model(cfg.model, num_classes, cfg.pretrained_path if with_weights else "", cfg.drop_rate,
                        cfg.head, cfg.head_hidden, cfg.head_dropout, cfg.model2,
                        cfg.pretrained_path2 if with_weights else "")
    return bucket_norms(model) if cfg.input_mode == "rect" else model


def frozen_stages(cfg: Config) -> int:
    """frozen_stages resolved: as set, or auto = the high-resolution stages when fine-tuning from
    weights (random early layers must learn; pretrained ones already hold edges and colours)."""
    if cfg.frozen_stages >= 0:
        return cfg.frozen_stages
    return HIGH_RESOLUTION if weights_given(cfg.pretrained_path) else 0


def count_parameters(cfg: Config, num_classes: int) -> int:
    """Parameters of the configured model, built on the meta device (no memory, no weights read),
    so the storage plan knows the checkpoint size before the cache is built; 0 when that fails."""
    try:
        with torch.device("meta"):
            model = model_from_config(cfg, num_classes, with_weights=False)
        return sum(p.numel() for p in model.parameters())
    except Exception as e:  # noqa: BLE001  (an init that needs real tensors: plan without it)
        log.warning("could not size the model before building it (%s); the storage plan ignores checkpoints", e)
        return 0


def make_scaler(enabled: bool):
    # torch.amp.GradScaler appeared in torch 2.3; older Kaggle images only have the cuda one.
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


SMOOTHED_LOSSES = ("auto", "ce", "complement")  # single-label losses that take label_smoothing
FINETUNE_SMOOTHING = 0.1


def label_smoothing(cfg: Config, task: str) -> float:
    """label_smoothing=-1 (auto): 0.1 for a single-label fine-tune from weights (a pretrained net fits a
    small training set in a few epochs and grows overconfident), else 0."""
    if task != "multiclass" or cfg.loss not in SMOOTHED_LOSSES:
        return 0.0
    if cfg.label_smoothing >= 0:
        return cfg.label_smoothing
    return FINETUNE_SMOOTHING if weights_given(cfg.pretrained_path) else 0.0


def build_loss(cfg: Config, task: str, train_targets: np.ndarray, num_classes: int):
    counts = None
    if cfg.class_balanced:
        counts = (train_targets.sum(0) if task == "multilabel"
                  else np.bincount(train_targets, minlength=num_classes)).astype(float).tolist()
    params = parse_kwargs(cfg.loss_args)
    smoothing = label_smoothing(cfg, task)
    if smoothing and "label_smoothing" not in params:  # loss_args is the more specific setting
        params["label_smoothing"] = smoothing
    return get_loss(cfg.loss, task, class_counts=counts, **params)


def batch_augment(cfg: Config, task: str, num_classes: int, level: str) -> BatchAugment | None:
    """`level`: the augmentation that runs on the device (assemble.augmentation_split decides)."""
    if not (level or cfg.mixup > 0 or cfg.cutmix > 0):
        return None
    return BatchAugment(level, cfg.mixup, cfg.cutmix, num_classes if task == "multiclass" else 0, fill=cfg.pad_fill)


def build_parts(cfg: Config, task: str, num_classes: int, train_targets: np.ndarray,
                device: torch.device, gpu_aug: str) -> TrainParts:
    """`gpu_aug`: the batch augmentation level on the device (TrainingData.gpu_aug)."""
    accel.tune(device, cfg.deterministic)
    model = model_from_config(cfg, num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        if not accel.has_tensor_cores(device):
            log.info("channels_last on %s, which has no tensor cores: NHWC may be slower than NCHW there "
                     "(channels_last=false to compare)", torch.cuda.get_device_name(device))
    stages = frozen_stages(cfg)
    frozen = freeze_early(model, stages)
    if frozen:
        log.info("frozen for the whole run: the stem and %s, %d of %d parameters (frozen_stages=%s)",
                 "the stages at stride <= 4" if stages == HIGH_RESOLUTION else f"the first {stages} stage(s)",
                 frozen, sum(p.numel() for p in model.parameters()),
                 "auto, fine-tuning" if cfg.frozen_stages < 0 else stages)
    dtype = accel.amp_dtype(cfg.amp_dtype, device)
    if cfg.amp and device.type == "cuda":  # said once here; the other callers of amp_dtype stay quiet
        log.info("mixed precision: %s%s", accel.dtype_name(dtype),
                 " with loss scaling" if accel.needs_loss_scaling(cfg.amp, dtype, device) else "")
        if dtype == torch.bfloat16 and not accel.bf16_is_fast(device):
            log.warning("!!! amp_dtype=bf16 on %s, which has no fast bf16: expect slow steps (fp16 is faster "
                        "there)", torch.cuda.get_device_name(device))
    return TrainParts(model=model, optimizer=create_optimizer(model, cfg.lr, cfg.weight_decay, cfg.layer_decay),
                      scaler=make_scaler(accel.needs_loss_scaling(cfg.amp, dtype, device)),
                      loss_fn=build_loss(cfg, task, train_targets, num_classes), ema=create_ema(model, cfg.ema),
                      batch_aug=batch_augment(cfg, task, num_classes, gpu_aug), swa=create_averager(model, cfg.swa))


def compile_step_model(cfg: Config, parts: TrainParts, task: str, num_classes: int, device: torch.device,
                       preprocess: Preprocess) -> None:
    """cfg.compile: compile now (accel.compile_for_training) on dummy batches shaped like the real
    ones, at every input size progressive resizing will train at (a size first seen in training
    would recompile on the training clock, and a second size makes Dynamo trace dynamic shapes, so
    each size gets its own static graph here), so the time is spent before the schedule is laid over
    the clock; sets parts.step_model (the compiled model, or None after a logged fallback) and
    parts.compiled."""
    skip = accel.compile_unsupported(device)
    if skip:
        log.warning("compile=true skipped on %s (%s): training runs the eager model",
                    torch.cuda.get_device_name(device), skip)
        parts.compiled, parts.step_model = accel.Compiled(parts.model, 0.0, f"skipped: {skip}"), None
        return
    sizes = warmup_sizes(cfg, parts.model)
    dtype = accel.amp_dtype(cfg.amp_dtype, device)

    def warmup(model: torch.nn.Module) -> None:
        model.train()
        hold_frozen_norms(model)
        for size in sizes:
            x, y, ok = dummy_batch(cfg.batch_size, size, task, num_classes, device, cfg.channels_last, preprocess)
            with autocast(device, cfg.amp, dtype):
                logits = model(x)
            parts.loss_fn(logits, y, ok).backward()

    log.info("compiling %s for training at %s px (compile=true; the time counts against the budget)", cfg.model,
             ", ".join(map(str, sizes)))
    result = accel.compile_for_training(parts.model, warmup, compiler=functools.partial(torch.compile, dynamic=False))
    result.sizes = tuple(sizes)
    parts.compiled = result
    if result.error:
        log.error("!!! torch.compile failed after %.1fs (%s): training continues with the eager model",
                  result.seconds, result.error)
        parts.step_model = None
    else:
        log.info("compiled in %.1fs (%d input size%s, warm-up included; charged to the budget)", result.seconds,
                 len(sizes), "" if len(sizes) == 1 else "s")
        parts.step_model = result.model


def warmup_sizes(cfg: Config, model: torch.nn.Module) -> list[int]:
    """Every input size training will run at: the progressive-resizing stages, else img_size."""
    sched = schedule_from(cfg.img_size, cfg.resize_start, cfg.resize_full_at)
    if sched is None or fixed_input_size(model):
        return [cfg.img_size]
    return sorted(set(sched.sizes()))


def dummy_batch(n: int, size: int, task: str, num_classes: int, device: torch.device, channels_last: bool,
                preprocess: Preprocess) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = normalize(torch.zeros(n, 3, size, size, dtype=torch.uint8, device=device), channels_last, preprocess)
    y = (torch.zeros(n, num_classes, device=device) if task == "multilabel"
         else torch.zeros(n, dtype=torch.long, device=device))
    return x, y, torch.ones(n, device=device)


def fit_options(cfg: Config, preprocess: Preprocess, device: torch.device) -> FitOptions:
    return FitOptions(lr=cfg.lr, warmup=cfg.warmup, schedule=cfg.schedule, epochs=cfg.epochs, amp=cfg.amp,
                      amp_dtype=accel.amp_dtype(cfg.amp_dtype, device),
                      channels_last=cfg.channels_last, checkpoint_every_s=parse_duration(cfg.checkpoint_every),
                      threshold=cfg.threshold, min_labels=cfg.min_labels, max_labels=cfg.max_labels,
                      beta=cfg.beta, clip_grad=cfg.clip_grad, freeze_until=cfg.freeze,
                      unfreeze_blocks=cfg.unfreeze_blocks, preprocess=preprocess, learn_hint=likely_causes(cfg),
                      resolution=schedule_from(cfg.img_size, cfg.resize_start, cfg.resize_full_at))
''',
'kernelkit.build.input_mode': r'''"""input_mode auto -> pad, rect or tiles, from the training images' aspect ratios (file headers only).

Squeezing or padding a 1:k strip into one square shrinks everything in it k times along the long
side; small objects vanish. Tiles keep the short side at img_size and look at `tiles` squares along
the long side (the model's max over them), at `tiles` times the compute per image. Measured on
bench/hard_task.py (README, input modes) at equal compute: fine-tuning ImageNet weights (lite0), tiles
won by far (test F2 0.731 tiles x3, 0.705 x2, 0.554 pad); from scratch pad won (0.510 against 0.479
and 0.459 at 16 pad-epochs). At larger sizes pad caught up (300 s on 2 cores: pad 0.954, tiles 0.945),
because tiles enlarge a square frame only as much as a strip's short side while pad enlarges it 3x.
Rect gives each image one square's pixels in its own shape, so both keep their scale: 0.967 on the
same task, three seeds, with BatchNorm statistics per bucket (README, input modes). So auto takes rect with pretrained weights when at least TILES_SHARE of the
sampled images are LONG or longer (tiles where rect cannot run), else pad (naming tiles as the option
when images are long). Tiles cost their count in compute, so the autopick may still swap them for
FALLBACK (autopick._choose_main).
"""
from __future__ import annotations

import dataclasses
import logging
import math

from ..core.context import RunContext
from ..core.weights import fixed_size_architecture, weights_given
from ..decide.reports import image_sizes
from ..engine.resume import describe_input_mode, stored_input_mode
from ..inputs.competition import Competition
from . import autopick

log = logging.getLogger("kernelkit")

LONG = 2.0  # long/short ratio from which a square input shrinks the content at least 2x
TILES_SHARE = 0.25  # share of long images from which the log points at input_mode=tiles
AUTO_TILES = (2, 3)  # tiles=0: the 75th percentile aspect ratio, rounded, within these (each costs a square)
SAMPLE = 500
# Tiles cost `tiles` squares an image. Where the budget cannot pay for them (the autopick finds no size
# at which the tiles fit their epochs, or only at its smallest size, under half the weights' size), one
# stretched square per image at a larger size is what holds up. Fine-tuning lite0 on the hard task
# (README, fine-tuning), multi-label test F2: on half a 2-core machine's compute tiles x3 at 64 px 0.732,
# squeeze at 96 px 0.815, pad 0.652; on one core of it tiles x3 at 64 px 0.832 (10 epochs: they fit),
# squeeze 0.874, pad 0.685; on the whole machine the tiles reached 96 px and tied squeeze (0.930, 0.937).
FALLBACK = "squeeze"


def choose_input_mode(sizes: dict, mode: str = "auto", tiles: int = 0, pretrained: bool = False,
                      rect_ok: bool = True) -> tuple[str, int, str]:
    """image_sizes(...) of the training images -> (mode, tiles, why). An explicit mode (and an explicit
    tile count) is kept; the reason says what was measured either way. `rect_ok`: rect can run here
    (one process, a model that takes any input size); else tiles take its place."""
    q = sizes.get("aspect_quantiles")
    if not q:
        return ("pad" if mode == "auto" else mode), tiles or (3 if mode == "tiles" else 0), \
            "no readable training image headers"
    share = sizes.get("long_share", 0.0)
    stats = f"{share:.0%} of {sizes.get('sampled', 0)} sampled images 1:{LONG:g} or longer, aspect p75 {q['p75']:.2f}"
    if mode == "auto" and share >= TILES_SHARE and pretrained:
        mode, why = ("rect" if rect_ok else "tiles"), f"{stats}, fine-tuning pretrained weights (>= {TILES_SHARE:.0%})"
    elif mode == "auto":
        mode, why = "pad", stats
        if share >= TILES_SHARE:
            why += ("; from scratch (no pretrained weights) pad won at equal compute, input_mode=tiles "
                    "forces tiles (README, input modes)")
    else:
        why = f"{stats}; set by input_mode={mode}"
    if mode == "tiles" and not tiles:
        tiles = min(AUTO_TILES[1], max(AUTO_TILES[0], math.ceil(q["p75"] - 0.25)))
    return mode, (tiles if mode == "tiles" else 0), why


def long_share(paths: list[str], seed: int) -> dict:
    sizes = image_sizes(paths, SAMPLE, seed, LONG)
    if "extreme_aspect_share" in sizes:
        sizes["long_share"] = sizes["extreme_aspect_share"]
    return sizes


def dry_run(ctx: RunContext) -> bool:
    return bool(getattr(ctx.args, "dry_run", False))


def resumed_mode(ctx: RunContext, classes: list) -> tuple[str, int] | None:
    """(mode, tiles) that auto resolved to in the run this one resumes; None when nothing is resumed, or
    its config is damaged (the rule decides then, and prepare judges the checkpoint)."""
    stored = autopick.resumed_config(ctx, classes)
    return stored_input_mode(stored) if stored else None


def resolve_input_mode(ctx: RunContext, comp: Competition) -> RunContext:
    """`ctx` with input_mode pad, squeeze, rect or tiles (and tiles set), logged with the reason; what
    checkpoints store. Tiles chosen by auto carry the fallback the autopick may still take
    (ctx.input_mode_fallback)."""
    cfg = ctx.cfg
    if cfg.input_mode in ("pad", "squeeze", "rect") or (cfg.input_mode == "tiles" and cfg.tiles):
        log.info("input mode: %s (set)", f"tiles x{cfg.tiles}" if cfg.input_mode == "tiles" else cfg.input_mode)
        return ctx
    # rect needs a model that takes any size, and no static compiled graph
    rect_ok = not (cfg.compile or fixed_size_architecture(cfg.model) or fixed_size_architecture(cfg.model2))
    # a dry run plans a fresh run (its autopick ignores the checkpoint too)
    resumed = resumed_mode(ctx, comp.classes) if cfg.input_mode == "auto" and not dry_run(ctx) else None
    tiles_possible = not rect_ok or (resumed is not None and resumed[0] == "tiles")
    if cfg.input_mode == "auto" and (cfg.mixup or cfg.cutmix) and tiles_possible:  # tiles cannot be mixed
        log.info("input mode: pad (mixup/cutmix are set, and tiles cannot be mixed)")
        return dataclasses.replace(ctx, cfg=dataclasses.replace(cfg, input_mode="pad"))
    if resumed is not None:  # a trained model keeps the images it was trained on, whatever a fresh pick would say
        mode, tiles = resumed
        log.info("input mode: %s (as the run this one resumes trained)", describe_input_mode(resumed))
        return dataclasses.replace(ctx, cfg=dataclasses.replace(cfg, input_mode=mode, tiles=tiles))
    sizes = ctx.train_image_sizes or long_share(comp.train_paths, cfg.seed)
    mode, tiles, why = choose_input_mode(sizes, cfg.input_mode, cfg.tiles, pretrained=weights_given(cfg.pretrained_path),
                                         rect_ok=rect_ok)
    fallback = FALLBACK if mode == "tiles" and cfg.input_mode == "auto" and autopick.measures(ctx) else ""
    if mode == "tiles":
        log.info("input mode: tiles x%d (short side at img_size, %d squares along the long side, max over them): %s%s",
                 tiles, tiles, why, f"; {fallback} if the autopick finds them too slow" if fallback else "")
    elif mode == "rect":
        log.info("input mode: rect (each image at one img_size square's pixels, in its own aspect ratio): %s", why)
    else:
        log.info("input mode: pad (one square per image): %s", why)
    return dataclasses.replace(ctx, cfg=dataclasses.replace(cfg, input_mode=mode, tiles=tiles),
                               input_mode_fallback=fallback, train_image_sizes=sizes)

''',
'kernelkit.core': r'''"""The ground floor: the typed run config (schema, checks, command line), the run context and its
stop flag, the one clock the budget reads (`clock`, which only tests scale), the Kaggle-or-local
environment switches, atomic file writes, the output-size plan, progress lines, process groups and
the accelerator settings. Everything above may use it; it imports nothing from the other kernelkit
packages, and nothing here imports torch at module level except `distributed` and `accel`, so
options are checked before the slow imports."""
''',
'kernelkit.core.accel': r'''"""Using the accelerator that was found: mixed-precision dtype, cuDNN tuning, optional torch.compile.

Each decision is a small function of the device and the user's setting, so the app layer
(components.py, train_job.py) can log it and the tests can check it without a GPU.

* `amp_dtype`: bf16 where the GPU runs it at full speed (compute capability 8.0+: A100, H100,
  L4, A10); fp16 with a GradScaler elsewhere (Kaggle's T4 and P100 have no fast bf16). bf16
  has fp32's exponent range, so it needs no loss scaling and never skips a step for overflow.
* `tune`: cudnn.benchmark picks the fastest convolution algorithms for the (fixed) input shape
  once; TF32 matmuls on Ampere+. Both off under `deterministic`, which wants repeatable kernels.
* `compile_for_training`: torch.compile is opt-in (compiling a resnet50 takes ~1 minute, paid
  back only over long runs). The compile is forced now, on a dummy batch, so its time is
  measured and spent before the schedule is laid over the clock, and a failure (no compiler,
  an unsupported op) falls back to the eager model instead of failing the run mid-way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .clock import now as clock_now

AMP_DTYPES = ("auto", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def bf16_is_fast(device: torch.device) -> bool:
    """True on CUDA GPUs of compute capability 8.0 or later (native bf16 tensor cores)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8 and torch.cuda.is_bf16_supported()


def amp_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for `choice` (auto | bf16 | fp16) on `device`; an explicit choice wins
    (components.build_parts says so when bf16 is slow there). Pure: every caller may ask."""
    if choice not in AMP_DTYPES:
        raise ValueError(f"amp_dtype={choice!r}: choose one of {' | '.join(AMP_DTYPES)}")
    if choice == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float16
    return _DTYPES[choice]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}.get(dtype, str(dtype))


def needs_loss_scaling(amp: bool, dtype: torch.dtype, device: torch.device) -> bool:
    """fp16 gradients underflow without a GradScaler; bf16 and fp32 do not."""
    return amp and device.type == "cuda" and dtype == torch.float16


def nonfinite_gradients(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """A 0-d float tensor on the gradients' device, 1 when any gradient holds inf or NaN (the check
    GradScaler runs, with scale 1); computed on the device, nothing read. None: no gradients."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    found = None
    for (device, _), grads in groups.items():
        flag = torch.zeros((), device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, flag, torch.ones((), device=device))
        found = flag if found is None else torch.maximum(found, flag.to(found.device, non_blocking=True))
    return found


class StepGuard:
    """Applies an optimizer step only when its gradients are finite, without the host reading a flag.

    fp16: the (enabled) GradScaler does it. bf16 and fp32 have no scaler, and a non-finite gradient
    would reach the weights; here the gradients are checked on the device and the flag is handed to
    an optimizer that skips on the device (fused AdamW: `_step_supports_amp_scaling`, the protocol
    GradScaler uses). Any other optimizer needs the flag on the host: one read per step, only then.
    `step` -> a 0-d float tensor on the device, 1 when the step was skipped (None under fp16, whose
    overflow skips are the scaler's normal business)."""

    def __init__(self, scaler):
        self.scaler = scaler

    def step(self, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        if self.scaler.is_enabled():
            self.scaler.step(optimizer)
            self.scaler.update()
            return None
        found = nonfinite_gradients(optimizer)
        if found is None:
            optimizer.step()
        elif getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.found_inf, optimizer.grad_scale = found, None
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf, optimizer.grad_scale
        elif not found.item():
            optimizer.step()
        return found


def tune(device: torch.device, deterministic: bool) -> None:
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic


TRITON_MIN_CAPABILITY = (7, 0)  # Triton (torch.compile's GPU code generator) needs Volta or later


def compile_unsupported(device: torch.device) -> str:
    """Why torch.compile cannot work on `device` ('' when it can): on a P100 (compute capability 6.0)
    Triton refuses only after the whole trace has been paid for, so it is skipped up front."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return ""
    cap = tuple(torch.cuda.get_device_capability(device))
    if cap < TRITON_MIN_CAPABILITY:
        return (f"compute capability {cap[0]}.{cap[1]} < {TRITON_MIN_CAPABILITY[0]}.{TRITON_MIN_CAPABILITY[1]}: "
                "Triton cannot generate code for this GPU")
    return ""


def has_tensor_cores(device: torch.device) -> bool:
    """False on CUDA GPUs before Volta (P100): there channels_last can be slower than NCHW."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return True
    return tuple(torch.cuda.get_device_capability(device)) >= (7, 0)


@dataclass
class Compiled:
    model: torch.nn.Module  # the compiled module, or the eager one after a failure
    seconds: float
    error: str = ""  # why it fell back to eager ('' = compiled)
    sizes: tuple[int, ...] = ()  # the input sizes the warm-up compiled for


def compile_for_training(model: torch.nn.Module, warmup: Callable[[torch.nn.Module], None],
                         compiler: Callable | None = None) -> Compiled:
    """torch.compile `model` and run `warmup(compiled)` (a forward and backward on a dummy batch)
    so the compile happens now. The model's buffers (BatchNorm statistics) are restored after the
    warm-up, and its gradients cleared, so the dummy batch leaves no trace in the weights.
    Any exception means: train eagerly, with the reason logged and returned."""
    compiler = compiler or torch.compile
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    t0 = clock_now()
    try:
        compiled = compiler(model)
        warmup(compiled)
        return Compiled(compiled, clock_now() - t0)
    except Exception as e:  # noqa: BLE001  (compilers fail in many ways: missing gcc/triton, graph breaks)
        return Compiled(model, clock_now() - t0, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        model.zero_grad(set_to_none=True)


def original_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a torch.compile wrapper (whose state_dict keys carry an '_orig_mod.' prefix)."""
    return getattr(model, "_orig_mod", model)
''',
'kernelkit.core.checks': r'''"""Checking a config: every option at once, so one run shows every mistake (`validate`), the type
of each CONFIG-block or preset value, unknown keys with the closest known one, the budget against
the margin, and the weights files against the model they are for. `checked_config` is the one way
from user input (a dict) to a Config that passed. Raises ConfigError (exit 2) naming each option."""
from __future__ import annotations

import difflib
from dataclasses import fields
from pathlib import Path
from typing import Any

from .config import (
    AUTO_ZERO,
    CHOICES,
    DURATIONS,
    PRESETS,
    TYPE_WORDS,
    Config,
    ConfigError,
    field_types,
    parse_duration,
    parse_kwargs,
)
from .weights import fixed_size_architecture, resolve_weights, same_architecture, weights_given


def checked_config(d: dict[str, Any], where: str = "config", check_paths: bool = True) -> Config:
    """A config from user input: unknown keys, wrong types and out-of-range values are refused.
    check_paths=False skips the files that only exist where the kernel runs (build time)."""
    refuse_unknown_keys(d, where)
    cfg = Config(**{k: _normalise(k, v) for k, v in d.items()})
    fill_architecture(cfg)
    validate(cfg, check_paths=check_paths)
    return cfg


def refuse_unknown_keys(d: dict[str, Any], where: str) -> None:
    known = [f.name for f in fields(Config)]
    problems = []
    for key in sorted(set(d) - set(known)):
        close = difflib.get_close_matches(str(key), known, n=2)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        problems.append(f"unknown {where} key {key!r}{hint}")
    if problems:
        raise ConfigError("; ".join(problems) + f". Known keys: {', '.join(known)}")


def _normalise(key: str, value: Any) -> Any:
    """Type check of one CONFIG-block or preset value: ints stay ints, a string is never a number."""
    typ = field_types()[key]
    if key in AUTO_ZERO and value == "auto":
        return 0
    if typ == "bool" and isinstance(value, bool):
        return value
    if typ == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typ == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ == "str" and isinstance(value, str):
        return value
    if typ == "str" and key in DURATIONS and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value}s"  # budget=3600 means seconds
    raise ConfigError(f"{key}={value!r}: expected {TYPE_WORDS[typ]}, got {type(value).__name__}")


def _range_problems(c: Config) -> list[str]:
    """(condition that must hold, what the user is told) for every numeric option."""
    rules = [
        (c.batch_size >= 1, f"batch_size={c.batch_size}: must be >= 1"),
        (c.img_size == 0 or 8 <= c.img_size <= 4096,
         f"img_size={c.img_size}: must be 0 (auto) or between 8 and 4096 pixels"),
        (c.auto_min_epochs >= 1, f"auto_min_epochs={c.auto_min_epochs}: must be >= 1"),
        (not (c.model == "auto" and weights_given(c.pretrained_path)),
         "pretrained_path is a weights file of one architecture: set model= to it (model='auto' picks by speed; "
         "a timm folder with config.json names its architecture itself)"),
        (1 <= c.tta <= 4, f"tta={c.tta}: must be 1 (no TTA), 2 (+ flip), 3 or 4 views"),
        (c.epochs >= 0, f"epochs={c.epochs}: must be >= 0 (0 = as many as fit the budget)"),
        (c.n_folds >= 2, f"n_folds={c.n_folds}: must be >= 2"),
        (-1 <= c.fold < c.n_folds, f"fold={c.fold}: must be -1 (off) or 0..{c.n_folds - 1} (n_folds={c.n_folds})"),
        (0 <= c.val_fraction < 1, f"val_fraction={c.val_fraction}: must be in [0, 1) (0 = train on everything)"),
        (c.threshold == -1 or 0 <= c.threshold <= 1, f"threshold={c.threshold}: must be -1 (search) or in [0, 1]"),
        (0 <= c.warmup < 1, f"warmup={c.warmup}: a share of training, in [0, 1)"),
        (c.label_smoothing == -1 or 0 <= c.label_smoothing < 1,
         f"label_smoothing={c.label_smoothing}: -1 (auto) or in [0, 1)"),
        (c.lr > 0, f"lr={c.lr}: must be > 0"),
        (c.weight_decay >= 0, f"weight_decay={c.weight_decay}: must be >= 0"),
        (0 <= c.drop_rate < 1 and 0 <= c.head_dropout < 1, "drop_rate and head_dropout must be in [0, 1)"),
        (0 <= c.freeze <= 1, f"freeze={c.freeze}: a share of training, in [0, 1]"),
        (0 <= c.layer_decay <= 1, f"layer_decay={c.layer_decay}: 0 (off) or in (0, 1]"),
        (0 <= c.ema < 1, f"ema={c.ema}: 0 (off) or a decay in (0, 1), e.g. 0.999"),
        (0 <= c.swa < 1, f"swa={c.swa}: 0 (off) or the share of the schedule to average over, in (0, 1), e.g. 0.25"),
        (1 <= c.sessions <= 100, f"sessions={c.sessions}: must be between 1 and 100"),
        (not c.epochs or c.epochs >= c.sessions,
         f"epochs={c.epochs} cannot be split over sessions={c.sessions}: need epochs >= sessions (or epochs=0)"),
        (c.pad_aspect == 0 or c.pad_aspect >= 1, f"pad_aspect={c.pad_aspect}: 0 (always resize) or >= 1"),
        (0 <= c.pad_fill <= 255, f"pad_fill={c.pad_fill}: a grey level in 0..255"),
        (c.resize_start == 0 or 0.25 <= c.resize_start < 1,
         f"resize_start={c.resize_start}: 0 (off) or a fraction of img_size in [0.25, 1), e.g. 0.5"),
        (0 < c.resize_full_at <= 1, f"resize_full_at={c.resize_full_at}: a share of the schedule in (0, 1]"),
        (c.mixup >= 0 and c.cutmix >= 0, "mixup and cutmix alphas must be >= 0"),
        (c.clip_grad >= 0, f"clip_grad={c.clip_grad}: must be >= 0 (0 = off)"),
        (0 <= c.balanced_sampling <= 1, f"balanced_sampling={c.balanced_sampling}: must be in [0, 1]"),
        (c.cache_max_gb >= 0, f"cache_max_gb={c.cache_max_gb}: must be >= 0"),
        (c.output_cap_gb >= -1, f"output_cap_gb={c.output_cap_gb}: -1 (auto), 0 (none) or a size in GB"),
        (c.num_workers >= -1, f"num_workers={c.num_workers}: -1 (all cores) or >= 0"),
        (c.ddp_procs >= 0, f"ddp_procs={c.ddp_procs}: must be >= 0"),
        (c.min_labels >= 0 and c.max_labels >= 0, "min_labels and max_labels must be >= 0"),
        (not c.max_labels or c.min_labels <= c.max_labels,
         f"min_labels={c.min_labels} > max_labels={c.max_labels}"),
        (c.beta > 0, f"beta={c.beta}: must be > 0"),
        (c.head_hidden >= 1 and c.unfreeze_blocks >= 0, "head_hidden must be >= 1 and unfreeze_blocks >= 0"),
        (c.frozen_stages >= -1, f"frozen_stages={c.frozen_stages}: a number of stages (0 = none, -1 = auto)"),
        (c.demo_images >= 20, f"demo_images={c.demo_images}: must be >= 20"),
        (c.max_train_images >= 0, f"max_train_images={c.max_train_images}: must be >= 0"),
        (c.mode != "infer" or bool(c.checkpoints), "mode='infer' needs checkpoints= (a file, folder or glob)"),
        (c.mode != "blend" or bool(c.checkpoints),
         "mode='blend' needs checkpoints= (run output folders, comma-separated or a glob)"),
        (not ((c.mixup or c.cutmix) and c.loss == "complement"),
         "mixup/cutmix give soft targets, which loss='complement' does not take"),
    ]
    return [msg for ok, msg in rules if not ok]


def _input_mode_problems(c: Config) -> list[str]:
    """What tiles and rect cannot be combined with."""
    rules = [
        (c.tiles == 0 or 2 <= c.tiles <= MAX_TILES,
         f"tiles={c.tiles}: 0 (auto) or 2..{MAX_TILES} squares along the long side"),
        (c.input_mode != "tiles" or not (c.mixup or c.cutmix),
         "input_mode=tiles cannot be combined with mixup/cutmix (each image is several tiles); set one of them off"),
        (c.input_mode != "rect" or not any(fixed_size_architecture(m) for m in (c.model, c.model2)),
         f"input_mode=rect feeds each image in its own shape, but {c.model!r}"
         f"{f' or {c.model2!r}' if c.model2 else ''} takes only its own input size; "
         "set input_mode=pad or tiles, or a convolutional model"),
        (c.input_mode != "rect" or not c.compile,
         "input_mode=rect cannot be combined with compile=true (a static graph per batch shape: rect has a dozen); "
         "set one of them off"),
    ]
    return [msg for ok, msg in rules if not ok]


def _choice_problems(c: Config) -> list[str]:
    out = []
    for key, allowed in CHOICES.items():
        value = getattr(c, key)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            out.append(f"{key}={value!r} is not one of {' | '.join(repr(a) for a in allowed)}{hint}")
    if c.preset and c.preset not in PRESETS:
        out.append(f"preset={c.preset!r} is not one of {' | '.join(sorted(PRESETS))}")
    return out


def _parse_problems(c: Config) -> list[str]:
    out = []
    for key in ("checkpoint_every", "grace"):
        try:
            if parse_duration(getattr(c, key)) <= 0:
                out.append(f"{key}={getattr(c, key)!r}: must be longer than 0 s")
        except ValueError as e:
            out.append(f"{key}: {e}")
    try:
        budget_and_margin(c.budget, c.margin, c.mode)
    except ValueError as e:
        out.append(f"budget={c.budget!r} / margin={c.margin!r}: {e}")
    try:
        parse_kwargs(c.loss_args)
    except ValueError as e:
        out.append(f"loss_args={c.loss_args!r}: {e}")
    return out


def _path_problems(c: Config) -> list[str]:
    """Files the run will need: a typo here would otherwise surface hours later, or never."""
    checks = [("data_dir", c.data_dir, "is_dir"), ("resume_from", c.resume_from, "is_file")]
    return [f"{key}={value!r} does not exist" for key, value, test in checks
            if value and not getattr(Path(value), test)()] + _weights_problems(c)


MAX_TILES = 6  # squares along an image's long side: each costs a forward pass
WEIGHTS_OF = (("model", "pretrained_path"), ("model2", "pretrained_path2"))  # each backbone and its weights


def _weights_problems(c: Config) -> list[str]:
    out = []
    for model_key, path_key in WEIGHTS_OF:
        model, path = getattr(c, model_key), getattr(c, path_key)
        if not weights_given(path):
            continue
        try:
            src = resolve_weights(path)
        except ValueError as e:
            out.append(str(e))
            continue
        if src.architecture and model not in MODEL_FROM_WEIGHTS and not same_architecture(model, src.architecture):
            out.append(f"{path_key} holds {src.architecture!r} weights (its config.json) but {model_key}={model!r}; "
                       f"set {model_key}={src.architecture!r} or leave it empty")
    if not c.model:
        out.append("model is empty: set model= to a timm model name, or point pretrained_path at a timm folder "
                   "(config.json + weights) to take the architecture from it")
    return out


MODEL_FROM_WEIGHTS = ("", "auto")  # model values that mean "whatever the weights folder holds"


def fill_architecture(cfg: Config) -> None:
    """An empty or 'auto' model (model2: empty) takes the architecture of its weights folder's
    config.json, so the config printed, saved and stored in checkpoints names the model that was built."""
    for model_key, path_key in WEIGHTS_OF:
        if getattr(cfg, model_key) not in MODEL_FROM_WEIGHTS or not weights_given(getattr(cfg, path_key)):
            continue
        try:
            arch = resolve_weights(getattr(cfg, path_key)).architecture
        except ValueError:
            continue  # validate() reports it with the other problems
        setattr(cfg, model_key, arch)


def validate(cfg: Config, check_paths: bool = True) -> None:
    """Every option at once, so one run shows every mistake; raises ConfigError naming each option."""
    problems = _choice_problems(cfg) + _range_problems(cfg) + _input_mode_problems(cfg) + _parse_problems(cfg)
    if check_paths:
        problems += _path_problems(cfg)
    if problems:
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems))


MIN_TRAIN_BUDGET_S = 20.0


def fmt(seconds: float) -> str:
    return f"{seconds:g}s"


def budget_and_margin(budget: str, margin: str, mode: str) -> tuple[float, float]:
    """-> (budget, margin) in seconds; the margin must leave time to work with. The budget clock
    (engine.budget.budget_seconds) takes its numbers from here, so the check and the clock agree."""
    total = parse_duration(budget)
    # Fixed costs (interpreter exit, worker teardown) dominate short runs, a share of the budget long ones.
    margin_s = min(600.0, 0.02 * total + 2.0) if margin == "auto" else parse_duration(margin)
    if total <= 0 or margin_s >= total:
        raise ValueError(f"budget {budget!r} must be positive and larger than margin {margin!r}")
    if mode == "train" and total - margin_s < MIN_TRAIN_BUDGET_S:
        raise ValueError(f"budget {budget!r} (margin {fmt(margin_s)}) leaves under {MIN_TRAIN_BUDGET_S:.0f} s: "
                         "start-up alone (imports, data index, model) takes seconds; give at least 1m")
    return total, margin_s
''',
'kernelkit.core.clock': r'''"""The one clock every budget decision reads: elapsed time, deadlines, throughput, checkpoint cadence.

`now()` is the wall clock, time.time(). Tests and benchmarks only (not an option, not in --help)
can set the environment variable KERNELKIT_TEST_CLOCK to `FACTOR` or `FACTOR@START`, read here and
nowhere else: the clock then reads START (default: the import of this module) plus FACTOR times the
CPU time this process has used. Every piece of work is FACTOR times longer on this clock, so a step
that takes 30 ms of CPU counts as 30 ms x FACTOR against the budget, and a 9-hour schedule runs in
9 h / FACTOR with its inference reserve, cadence and deadlines exercised, not bypassed. CPU time,
not wall time: on a shared machine the wall clock also holds other processes' load, which FACTOR
would turn into hours; the CPU time is this run's own work. (The simulated runs are one process
with no loader workers, whose CPU would not count; the only wait on this clock, a rank polling for
rank 0 in distributed.main_done, needs several ranks and so never runs on it.)
A restart after a kill is given START = the time of the kill, so one run keeps one time line.
"""
from __future__ import annotations

import os
import time

ENV = "KERNELKIT_TEST_CLOCK"


def _parse(value: str) -> tuple[float, float]:
    """-> (factor, start) from 'FACTOR' or 'FACTOR@START'; an empty value is the real clock."""
    if not value.strip():
        return 1.0, 0.0
    factor, _, start = value.partition("@")
    f = float(factor)
    if not f > 0:
        raise ValueError(f"{ENV}={value!r}: the factor must be positive")
    return f, float(start) if start else time.time()


FACTOR, START = _parse(os.environ.get(ENV, ""))


def scaled() -> bool:
    return FACTOR != 1.0


def now() -> float:
    return START + FACTOR * time.process_time() if scaled() else time.time()


def at(wall_time: float) -> float:
    """The clock's reading for a time.time() taken at process start (kernel.py records it before the
    imports); on the test clock that is START, so the imports count against the budget either way."""
    return START if scaled() else wall_time
''',
'kernelkit.core.config': r'''"""The one typed config: its schema. Every option with its default, help text and allowed values
(`Config`, CHOICES), the presets, and the value syntax (durations, key=value lists). Checking a
config is `checks`'s; reading one from the command line and the CONFIG block is `options`'s.
Defaults < preset < CONFIG block in kernel.py < command line."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


def _f(default: Any, help: str, choices: tuple | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


# The allowed values of every choice-valued option, in one place: argparse `choices`, the check of
# CONFIG-block values and presets, and --help all read them from here. Modules that implement a
# choice (losses.LOSSES, transforms.AUG_LEVELS, ...) are checked against these in the tests.
AUG_LEVELS = ("none", "flip", "light", "medium", "strong")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
CHOICES: dict[str, tuple] = {
    "mode": ("train", "infer", "blend"),
    "format": ("auto", "multilabel_csv", "single_label_csv", "folder"),
    "head": ("linear", "mlp"),
    "aug": ("auto", *AUG_LEVELS),
    "gpu_aug": ("auto", "", *AUG_LEVELS[1:]),
    "amp_dtype": ("auto", "bf16", "fp16"),
    "schedule": ("linear", "cosine"),
    "loss": ("auto", "bce", "bce_sum", "focal", "asl", "ce", "complement"),
    "threshold_rule": ("global", "group", "class"),
    "mp_context": ("", "spawn", "forkserver", "fork"),
    "ddp_backend": ("", "nccl", "gloo"),
    "image_ext": ("", *IMAGE_EXTS),
    "input_mode": ("auto", "pad", "squeeze", "tiles", "rect"),
}


@dataclass
class Config:
    # what to run
    mode: str = _f("train", "train: train then predict | infer: predict from saved checkpoints | blend: weight "
                            "K-fold runs' test probabilities by their out-of-fold scores", choices=CHOICES['mode'])
    preset: str = _f("", "named preset applied under your settings (demo, ...)")
    data_dir: str = _f("", "competition folder; empty = find it under /kaggle/input, else run the demo (never on Kaggle)")
    id_column: str = _f("", "train.csv column holding the image ids; empty = detect (sample submission, known names)")
    label_column: str = _f("", "train.csv column holding the labels; empty = detect (sample submission, known names)")
    train_images: str = _f("", "folder of the training images inside data_dir; empty = detect (train, train_images, ...)")
    test_images: str = _f("", "folder of the test images inside data_dir; empty = detect (test, test_images, ...)")
    image_ext: str = _f("", "only files with this extension are images (when a.jpg and a.png both exist); "
                            "empty = any of .jpg .jpeg .png .webp .bmp .tif .tiff .gif", choices=CHOICES['image_ext'])
    format: str = _f("auto", "auto | multilabel_csv | single_label_csv | folder", choices=CHOICES['format'])
    out_dir: str = _f("", "outputs (checkpoints, submission.csv); empty = /kaggle/working or ./outputs")
    checkpoints: str = _f("", "infer mode: checkpoint file, folder or glob; blend mode: run output folders "
                              "(comma-separated, globs allowed), each with test_probs.npy and oof/")
    # model
    model: str = _f("auto", "timm model name; auto = the largest of a small ladder (resnet10t..resnet34 on CPU, "
                            "resnet18..convnext_tiny on GPU) that fits auto_min_epochs epochs, timed at start; "
                            "auto or empty with a timm weights folder = the architecture in its config.json")
    pretrained_path: str = _f("", "local weights: a file (.safetensors/.pth/.bin) or a timm/Hugging Face folder "
                                  "(config.json + model.safetensors, e.g. a Kaggle Model); empty = on Kaggle with "
                                  "model=auto, a timm weights folder among the attached inputs (several: autopick "
                                  "ranks them), else random init; none = random init, no search. With weights, "
                                  "the options you leave unset take the fine-tuning recipe (FINETUNE in core/options.py)")
    drop_rate: float = _f(0.0, "dropout before the classifier")
    head: str = _f("linear", "linear | mlp (BatchNorm, Dense head_hidden, ReLU, Dropout: the Scene-15 head)", choices=CHOICES['head'])
    head_hidden: int = _f(256, "mlp head width")
    head_dropout: float = _f(0.5, "dropout in a custom head")
    model2: str = _f("", "second backbone whose pooled features are concatenated with the first (Helsinki ensemble)")
    pretrained_path2: str = _f("", "local weights of model2")
    freeze: float = _f(0.0, "share of training with the backbone frozen (head only): 1 = linear probe, "
                            "0.3 = two-stage fine-tune")
    unfreeze_blocks: int = _f(0, "after the frozen stage train the last N backbone blocks/stages (0 = all)")
    frozen_stages: int = _f(-1, "stem and the first N backbone stages frozen for the whole run, their BatchNorm "
                                 "statistics kept: steps skip the gradients of the largest activations (0 = none; "
                                 "-1 auto = with weights, the stem and the stages at stride <= 4, else none; none for "
                                 "thumbnails, images enlarged 2x or more at every size the run may train at)")
    layer_decay: float = _f(0.0, "layer-wise LR decay, e.g. 0.75 (0 = off)")
    ema: float = _f(0.0, "EMA decay of the weights, e.g. 0.999; the EMA is validated and predicts (0 = off)")
    swa: float = _f(0.0, "average the weights over this last share of the schedule, e.g. 0.25 (SWA; BatchNorm "
                         "recomputed after): it predicts when it validates at least as well (0 = off)")
    # images
    img_size: int = _f(0, "square input size; 0 or 'auto' = the images' median size (never upscaled past it), "
                          "lowered until auto_min_epochs fit")
    auto_min_epochs: int = _f(10, "model/img_size auto: the epochs the chosen pair must fit in the training time")
    pad_aspect: float = _f(2.0, "input_mode pad: pad to square when long/short side exceeds this (0 = always resize)")
    pad_fill: int = _f(255, "grey level of the padding (iMet seed pads with white)")
    input_mode: str = _f("auto", "pad: each image resized (or padded, see pad_aspect) to one img_size square | "
                                 "squeeze: each image stretched to one square, whatever its aspect | tiles: "
                                 "short side resized to img_size, `tiles` squares along the long side, the network "
                                 "sees each and takes the max over them (long strips keep small objects at scale) | "
                                 "rect: each image at one img_size square's pixel count in the shape of its aspect "
                                 "ratio (buckets 1:1 to 1:5), batches grouped by shape | "
                                 "auto: rect when fine-tuning pretrained weights and at least a quarter of the "
                                 "sampled training images are 1:2 or longer (tiles where rect cannot run: "
                                 "compile, a fixed-size model; then squeeze when the autopick fits the tiles' "
                                 "auto_min_epochs at no size or only at its smallest), else pad (measured: README, "
                                 "input modes; the log says which and why)",
                      choices=CHOICES['input_mode'])
    tiles: int = _f(0, "input_mode=tiles: squares per image along the long side, 2-6; longer images are shrunk to "
                       "fit them (0 = the 75th percentile of the training images' long/short ratio, rounded, 2-3)")
    aug: str = _f("auto", "auto (light, or flip for thumbnails: images enlarged 2x or more to img_size) | none | "
                          "flip | light (flip + random resized crop) | medium (+ colour jitter) | "
                          "strong (+ shift/scale/rotate, noise)", choices=CHOICES['aug'])
    gpu_aug: str = _f("auto", "batch augmentation on the training device: auto = on a GPU with the training images "
                              "cached, `aug` runs there on whole batches and the CPU only gathers cached rows; "
                              "'' = off (aug runs per image on the CPU) | flip | light | medium | strong",
                      choices=CHOICES['gpu_aug'])
    mixup: float = _f(0.0, "mixup alpha (0 = off)")
    cutmix: float = _f(0.0, "cutmix alpha (0 = off); with both, each batch picks one")
    resize_start: float = _f(0.5, "progressive resizing: train at this fraction of img_size first, in up to 4 "
                                  "stages, at the full img_size from resize_full_at of the schedule on; stages "
                                  "are shares of the wall clock; validation at the stage's size until the last stage, "
                                  "the best checkpoint from the largest size reached, TTA at img_size (0 = off)")
    resize_full_at: float = _f(0.75, "progressive resizing: share of the schedule after which training is at the "
                                     "full img_size, in (0, 1]")
    cache_images: bool = _f(True, "decode each training image once to img_size into a uint8 cache reused every epoch")
    cache_dir: str = _f("", "image cache folder; empty = /kaggle/temp on Kaggle (not saved as output), "
                            "else <out_dir>/cache")
    cache_max_gb: float = _f(15.0, "cap on the cache; images beyond it are decoded every epoch (0 = free disk)")
    output_cap_gb: float = _f(-1.0, "cap on what the run keeps in out_dir, checkpoints and a cache there included "
                                    "(checked before writing); -1 = 19.5 on Kaggle, which keeps at most 20 GB of "
                                    "/kaggle/working, else none; 0 = none")
    # training
    budget: str = _f("8h30m", "wall-clock budget for the whole kernel, e.g. 9h, 8h30m, 90s")
    margin: str = _f("auto", "safety margin kept free at the end of the budget; auto = 2% + 2s, at most 10m")
    epochs: int = _f(0, "0 = as many as fit the budget (schedule over time); >0 = fixed epochs")
    batch_size: int = _f(32, "images per optimiser step (per process under DDP)")
    lr: float = _f(1e-3, "peak AdamW learning rate")
    weight_decay: float = _f(0.05, "AdamW weight decay")
    warmup: float = _f(0.05, "fraction of training spent warming up")
    clip_grad: float = _f(0.0, "clip the gradient norm to this (0 = off)")
    schedule: str = _f("linear", "decay to zero at the end of training: linear | cosine", choices=CHOICES['schedule'])
    val_fraction: float = _f(0.1, "held-out share of train for validation and thresholds (0 = train on all)")
    fold: int = _f(-1, "K-fold: validate on this fold (0..n_folds-1) instead of val_fraction; -1 = off")
    n_folds: int = _f(5, "K-fold: number of folds (iterative stratification for multi-label)")
    loss: str = _f("auto", "auto (bce / ce) | bce | bce_sum | focal | asl | ce | complement", choices=CHOICES['loss'])
    loss_args: str = _f("", "loss parameters, e.g. 'gamma=2,reduce=sum' (focal) or 'label_smoothing=0.1'")
    label_smoothing: float = _f(-1.0, "single-label cross-entropy label smoothing (loss auto/ce/complement, unless "
                                      "loss_args sets it); -1 = auto: 0.1 when fine-tuning from weights, else 0")
    class_balanced: bool = _f(False, "weight classes by effective number of samples (Cui et al. 2019)")
    balanced_sampling: float = _f(0.0, "draw images ~ 1/count(class)^this (0 = plain shuffle, 0.5 = sqrt, 1 = equal)")
    amp: bool = _f(True, "mixed precision on GPU")
    amp_dtype: str = _f("auto", "auto = bf16 on GPUs with fast bf16 (A100, H100, L4), fp16 + loss scaling elsewhere "
                                "(T4, P100) | bf16 | fp16", choices=CHOICES['amp_dtype'])
    compile: bool = _f(False, "torch.compile the model for training; the compile runs at start, its time is "
                              "charged to the budget, and a failure falls back to eager (not under DDP)")
    channels_last: bool = _f(True, "GPU: NHWC memory layout (faster convolutions with AMP)")
    num_workers: int = _f(-1, "-1 = all CPU cores")
    mp_context: str = _f("", "DataLoader worker start method: '' (default) | spawn | forkserver | fork", choices=CHOICES['mp_context'])
    seed: int = _f(42, "seeds Python, NumPy, torch and every loader worker; stored in the checkpoints")
    deterministic: bool = _f(False, "GPU: deterministic kernels (cudnn.deterministic, no benchmark); slower")
    ddp_procs: int = _f(0, "data-parallel processes: 0 = one per GPU when several are visible (T4 x2), 1 = off")
    ddp_backend: str = _f("", "'' = nccl on GPU, gloo on CPU", choices=CHOICES['ddp_backend'])
    checkpoint_every: str = _f("20m", "also save last.pt at this wall-clock interval")
    resume: bool = _f(True, "continue an unfinished run from out_dir/last.pt (its time counts against the budget)")
    resume_from: str = _f("", "continue from this checkpoint of an earlier session (e.g. an attached dataset); "
                              "the budget is what this session has left")
    sessions: int = _f(1, "Kaggle sessions one schedule is laid over: each trains its 1/N slice, saves and "
                          "submits; the next continues with resume_from=<previous>/last.pt")
    max_train_images: int = _f(0, "use only this many training images (0 = all); for quick runs")
    grace: str = _f("20s", "on SIGTERM/SIGINT: stop training and predict within about this long (fewer TTA views if "
                           "needed), then exit 0 with a submission")
    # inference
    tta: int = _f(2, "test-time augmentation views: 1 = none, 2 = + horizontal flip")
    beta: float = _f(2.0, "multi-label metric: F-beta averaged per image (iMet: 2)")
    threshold: float = _f(-1.0, "multi-label threshold; <0 = chosen on validation (rules.settled_threshold)")
    threshold_rule: str = _f("global", "multi-label search: global | group (by 'prefix::' of label names) | class", choices=CHOICES['threshold_rule'])
    min_labels: int = _f(0, "multi-label: always emit at least this many labels per image")
    max_labels: int = _f(0, "multi-label: at most this many labels per image (0 = no cap)")
    # demo
    demo_images: int = _f(1000, "demo: number of generated training images")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def geometry(self) -> tuple[int, float, int, int]:
        """(img_size, pad_aspect, pad_fill, tiles): what decoding an image to the network's input depends on
        (transforms and the image cache take it as is); squeeze is pad with every image stretched, rect
        has tiles 0 (data.images.RECT: one rectangle, no squares)."""
        pad_aspect = 0.0 if self.input_mode == "squeeze" else self.pad_aspect
        return self.img_size, pad_aspect, self.pad_fill, 0 if self.input_mode == "rect" else self.input_tiles()

    def input_tiles(self) -> int:
        """Squares of img_size an image costs: 1 (pad, squeeze, rect: one square's pixels in its own shape,
        or a stored config from before the option, whose 'auto' was never resolved) or the resolved tile count."""
        return max(2, self.tiles or 3) if self.input_mode == "tiles" else 1

    @classmethod
    def from_stored(cls, d: dict[str, Any]) -> "Config":
        """The config stored in a checkpoint (any kernelkit version): keys this version does not know
        are dropped and missing ones take their defaults; no range checks (it was valid when saved)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: Path) -> None:
        from .fileio import write_json
        write_json(path, self.to_dict())

    def pretty(self) -> str:
        return "\n".join(f"  {k:<18} = {v!r}" for k, v in self.to_dict().items())


class ConfigError(ValueError):
    """A setting that cannot work, found before anything slow ran: the kernel exits with status 2."""


def field_types() -> dict[str, str]:
    # `from __future__ import annotations` keeps annotations as strings: "int", "float", "bool", "str".
    return {f.name: str(f.type) for f in fields(Config)}


DURATIONS = ("budget", "margin", "checkpoint_every", "grace")
AUTO_ZERO = ("img_size",)  # int options where 'auto' is accepted for 0
TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string"}


# One preset per reference project the toolkit reproduces (iMet 2019, iNaturalist 2019, Scene-15,
# Helsinki 14-tag photos): what it did, with a current timm backbone.
# Attach ImageNet weights for the backbone and set pretrained_path; everything else is set here.
PRESETS: dict[str, dict[str, Any]] = {
    "demo": dict(
        model="resnet18", img_size=64, batch_size=32, lr=2e-3, budget="150s",
        aug="flip", pad_aspect=2.0, val_fraction=0.2, checkpoint_every="1m", tta=2, warmup=0.05,
    ),
    # iMet 2019 (seeds 000, 001): 1103 culture/tag labels, F2 per image, odd aspect ratios padded
    # to square with white, focal loss, best threshold searched on validation (here per group:
    # culture:: and tag:: labels get their own), at least one label per image, 9-hour kernel.
    "imet2019": dict(
        format="multilabel_csv", model="convnext_tiny.fb_in22k", img_size=320, batch_size=32, lr=4e-4,
        layer_decay=0.8,
        pad_aspect=2.0, pad_fill=255, aug="light", loss="focal", loss_args="gamma=2", beta=2.0,
        threshold_rule="group", min_labels=1, budget="8h45m", tta=2, val_fraction=0.1,
    ),
    # iNaturalist 2019 (seed 002): 1010 species, one label each, top-1 error, 560 px inputs,
    # complement entropy next to cross-entropy, class-balanced weights for the long tail.
    "inat2019": dict(
        format="single_label_csv", model="efficientnet_b3.ra2_in1k", img_size=560, batch_size=16, lr=3e-4,
        pad_aspect=0.0, aug="light", loss="complement", balanced_sampling=0.5, budget="8h45m", tta=2,
        val_fraction=0.05,
    ),
    # Scene-15 (seed 003): folder per class, 15 scenes, ResNet-101 transfer learning, 70/30 split,
    # shift/zoom/flip augmentation, accuracy.
    "scene15": dict(
        format="folder", model="resnet101.a1h_in1k", img_size=224, batch_size=32, lr=3e-4, aug="light",
        loss="ce", val_fraction=0.3, tta=2, budget="2h", pad_aspect=0.0,
        head="mlp", head_hidden=256, head_dropout=0.5, freeze=0.3, unfreeze_blocks=2,
    ),
    # Helsinki 14 tags (seed 004): 128 px photos with zero or more of 14 labels (half have none),
    # sum of per-label BCE with the seed's 0.99p + 0.005 clamp, F1 / precision / recall.
    "helsinki14": dict(
        format="multilabel_csv", model="resnet50.a1_in1k", img_size=128, batch_size=64, lr=1e-3, aug="light",
        loss="bce_sum", loss_args="eps=0.005", beta=1.0, min_labels=0, threshold_rule="class", tta=2,
        budget="2h", val_fraction=0.15, pad_aspect=0.0,
        model2="efficientnet_b0.ra_in1k", freeze=0.2, ema=0.999,
    ),
}


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([hms]?)")


def parse_duration(text: str | float | int) -> float:
    """'9h', '8h30m', '90s', '1.5h', '600' -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    s = text.strip().lower().replace(" ", "")
    if not s:
        raise ValueError("empty duration")
    pos, total = 0, 0.0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * {"h": 3600, "m": 60, "s": 1, "": 1}[m.group(2)]
        pos = m.end()
    if pos != len(s):
        raise ValueError(f"cannot parse duration {text!r}; use e.g. 9h, 8h30m, 90s")
    return total


def parse_kwargs(text: str) -> dict[str, Any]:
    """'gamma=2,reduce=sum' -> {'gamma': 2.0, 'reduce': 'sum'}."""
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"cannot parse {item!r} in {text!r}; use key=value pairs separated by commas")
        value = value.strip()
        try:
            out[key.strip()] = float(value)
        except ValueError:
            out[key.strip()] = {"true": True, "false": False, "none": None}.get(value.lower(), value)
    return out
''',
'kernelkit.core.context': r'''"""What one run knows about itself: its config, where it reads and writes, when it started, its
stop flag, and which phase it is in (the exit status depends on it)."""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config
from .stopping import StopFlag

log = logging.getLogger("kernelkit")

SETUP, TRAINING, PREDICTING = "setup", "training", "predicting"

# The exit contract (Kaggle fails a run on any non-zero status).
EXIT_OK = 0  # a valid submission.csv was written (problems after training started are logged loudly)
EXIT_NO_SUBMISSION = 1  # nothing valid could be written; the reason is the last thing in the log
EXIT_REFUSED = 2  # refused before training: a bad option, data or sample submission, named in the message
EXIT_PLAN_DOES_NOT_FIT = 4  # --dry-run: the plan does not fit the budget


class Phase:
    """The run's phase, one object shared by every copy of its context (like the stop flag): a job
    that works on a copy (autopick's, with the concrete model) moves the whole run on, so the
    command line and the launcher, which hold the original, rescue instead of refusing."""

    def __init__(self, name: str = SETUP):
        self.name = name


@dataclass
class RunContext:
    cfg: Config
    args: argparse.Namespace
    data_dir: Path
    out_dir: Path
    is_demo: bool
    t_start: float
    stop: StopFlag = field(default_factory=StopFlag)
    stage: Phase = field(default_factory=Phase)
    # The attached inputs were searched for timm weights folders (on Kaggle, model=auto, no pretrained_path):
    # what was found (several: autopick ranks them), or None when there was no search.
    weights_found: tuple[Path, ...] | None = None
    # input_mode auto chose tiles: the mode autopick takes instead when the tiles do not fit their epochs
    # ('' = none: the mode was set, or is not tiles).
    input_mode_fallback: str = ""
    # Header statistics of a sample of the training images (decide.reports.image_sizes), read once by
    # input_mode auto and reused by aug auto; None when nothing has read them.
    train_image_sizes: dict | None = None

    @property
    def phase(self) -> str:
        """Failures in SETUP are refusals (exit 2); later ones must still leave a submission."""
        return self.stage.name

    @phase.setter
    def phase(self, name: str) -> None:
        self.stage.name = name


def setup_logging() -> None:
    """Timestamped lines on stdout, unless the host (pytest, a notebook that set up logging)
    already handles records: then ours propagate to it instead of printing twice."""
    log = logging.getLogger("kernelkit")
    log.setLevel(logging.INFO)
    if not log.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
''',
'kernelkit.core.distributed': r'''"""Data-parallel training over several processes (Kaggle's "GPU T4 x2"), started from inside
kernel.py (no torchrun on Kaggle) or by torchrun.

Rank 0 owns the budget clock: it decides when training stops and what the schedule position is,
and broadcasts both every step, so all ranks take the same number of steps with the same LR.
Only rank 0 validates, writes checkpoints and the submission.

No wait here is unbounded. The ranks meet through a TCP store that this module polls, so an address
nothing answers on, a port in use or a peer that never starts ends the rendezvous within
`RENDEZVOUS_S` (or at once on SIGTERM) with `RendezvousFailed`, instead of the store's 30 minutes
of retries. While rank 0 works alone (cache build, model choice, validation), the other ranks wait
on a store key with the run's own deadline (`main_done`), not in a collective whose timeout a
9-hour run would outlast.
"""
from __future__ import annotations

import datetime
import inspect
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .clock import now as clock_now

log = logging.getLogger("kernelkit")

RENDEZVOUS_S = 15.0  # the ranks start together: a peer that has not arrived by then is not coming
COLLECTIVE_TIMEOUT_S = 1800.0  # torch's default; the long solo phases wait on store keys instead
POLL_S = 0.2
# Read here only, set only by the test harness: "R" or "R,C" seconds for the rendezvous deadline and
# the collective timeout, so a test's rendezvous gives up quickly, or rank 0's solo phases outlast
# the collective timeout.
TEST_TIMEOUT_ENV = "KERNELKIT_TEST_DIST_TIMEOUT_S"


def timeouts() -> tuple[float, float]:
    """-> (rendezvous deadline, collective timeout), in seconds."""
    forced = [float(x) for x in os.environ.get(TEST_TIMEOUT_ENV, "").split(",") if x.strip()]
    if not forced:
        return RENDEZVOUS_S, COLLECTIVE_TIMEOUT_S
    return forced[0], forced[-1]


class RendezvousFailed(RuntimeError):
    """The ranks did not all meet in time (or a stop was requested while they waited)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        """Each rank its own GPU, whatever the backend (gloo on a GPU machine too); else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank if self.enabled else 0)
        return torch.device("cpu")


SINGLE = DistInfo()
_CONTROL: dict[str, object] = {}  # the per-step control group (control_group) and the timeout it gets


def from_torchrun() -> DistInfo | None:
    """torchrun (or any launcher using env://) sets RANK / WORLD_SIZE / LOCAL_RANK."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def wanted_processes(ddp_procs: int) -> int:
    """0 = one per GPU when several are visible; 1 = off; N = N processes (gloo on CPU)."""
    if ddp_procs > 0:
        return ddp_procs
    return torch.cuda.device_count() if torch.cuda.device_count() > 1 else 1


def default_backend(backend: str) -> str:
    return backend or ("nccl" if torch.cuda.is_available() else "gloo")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_share(cpus: int, world_size: int, cap: int = 8) -> int:
    """CPU threads (and loader workers) one rank may use: the machine's cores split between the ranks
    (T4 x2 has 4 vCPUs: 2 each, not 4 each), at most `cap`, at least 1."""
    return max(1, min(cap, cpus // max(1, world_size)))


def rendezvous_address(init_method: str) -> tuple[str, int]:
    """tcp://host:port, or env:// (MASTER_ADDR / MASTER_PORT, as torchrun sets them)."""
    if init_method.startswith("tcp://"):
        host, _, port = init_method[len("tcp://"):].rpartition(":")
        return host, int(port)
    return os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))


_store: dist.Store | None = None
_waits = 0  # solo phases so far: every rank counts the same sequence, so the keys match


def init(info: DistInfo, init_method: str = "env://", stop=None) -> None:  # noqa: ANN001  (a StopFlag)
    """Meet the other ranks within the rendezvous deadline, then start the process group on that store.
    Raises RendezvousFailed (nothing is left initialised)."""
    global _store, _waits
    deadline_s, collective_s = timeouts()
    host, port = rendezvous_address(init_method)
    where = f"{host}:{port}"
    log.info("rank %d: meeting %d ranks at %s (giving up after %.0f s)", info.rank, info.world_size, where, deadline_s)
    store = _meet(info, host, port, time.time() + deadline_s, stop, where)
    store.set_timeout(datetime.timedelta(seconds=collective_s))
    if info.backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(info.backend, store=store, rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(seconds=collective_s))
    _store, _waits = store, 0
    _CONTROL["timeout_s"] = collective_s  # the control group waits as long as the default one


def _meet(info: DistInfo, host: str, port: int, deadline: float, stop, where: str) -> dist.Store:  # noqa: ANN001
    # torchrun's agent already serves a store at MASTER_PORT: every rank is its client then.
    hosts = info.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"
    prefix = f"kernelkit/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    if hosts:
        try:
            store = dist.TCPStore(host, port, info.world_size, True, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=max(1.0, deadline - time.time())))
        except (RuntimeError, OSError) as e:  # DistNetworkError: port in use, address not ours
            raise RendezvousFailed(f"rank 0 cannot listen on {where}: {_first_line(e)}") from e
    else:
        store = _connect(host, port, info.world_size, deadline, stop, where)
    try:
        _wait_for_all(info, store, prefix, deadline, stop, where)
    except RendezvousFailed:
        raise
    except RuntimeError as e:  # DistNetworkError: the host of the store went away meanwhile
        raise RendezvousFailed(f"rendezvous at {where} broke off: {_first_line(e)}") from e
    return store


def _wait_for_all(info: DistInfo, store: dist.Store, prefix: str, deadline: float, stop,  # noqa: ANN001
                  where: str) -> None:
    store.set(f"{prefix}arrived/{info.rank}", "1")
    peers = [f"{prefix}arrived/{r}" for r in range(info.world_size)]
    while not (store.check(peers) if info.rank == 0 else store.check([prefix + "go"])):
        if store.check([prefix + "abandoned"]):
            raise RendezvousFailed(f"rank 0 stopped waiting for the other ranks at {where}")
        missing = [] if info.rank else [r for r, k in enumerate(peers) if not store.check([k])]
        why = ("a stop was requested" if stop is not None and stop.requested else
               "not every rank arrived in time" if time.time() > deadline else "")
        if why:
            if info.rank == 0:
                store.set(prefix + "abandoned", "1")  # a late rank gives up at once instead of waiting
            raise RendezvousFailed(f"rendezvous at {where} did not complete: {why}"
                                   + (f" (ranks {missing} never arrived)" if missing else ""))
        time.sleep(POLL_S)
    if info.rank == 0:
        store.set(prefix + "go", "1")


def _connect(host: str, port: int, world_size: int, deadline: float, stop, where: str) -> dist.Store:  # noqa: ANN001
    """A store client, connecting in a thread: torch retries inside C++ for the whole timeout, where
    no signal handler runs, so the main thread polls the stop flag meanwhile. (A connect abandoned on
    SIGTERM is left to its daemon thread, which ends at its own timeout or with the process.)"""
    box: dict = {}

    def connect() -> None:
        try:
            box["store"] = dist.TCPStore(host, port, world_size, False,
                                         timeout=datetime.timedelta(seconds=max(1.0, deadline - time.time())))
        except Exception as e:  # noqa: BLE001  (reported by the main thread)
            box["error"] = e

    worker = threading.Thread(target=connect, name="kernelkit-rendezvous", daemon=True)
    worker.start()
    while worker.is_alive():
        if stop is not None and stop.requested:
            raise RendezvousFailed(f"rendezvous at {where} did not complete: a stop was requested")
        worker.join(POLL_S)
    if "error" in box:
        raise RendezvousFailed(f"cannot reach rank 0 at {where}: {_first_line(box['error'])}") from box["error"]
    return box["store"]


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def main_done(info: DistInfo, deadline: float) -> None:
    """Call on every rank after a phase rank 0 does alone: rank 0 marks it done, the others poll for
    the mark (no collective, so no collective timeout) until `deadline` (a clock.now() time: the run's deadline). A peer that
    died, or the deadline passing, raises RuntimeError: this rank cannot go on without rank 0."""
    global _waits
    if not info.enabled or _store is None:
        return
    _waits += 1
    key = f"kernelkit/solo/{_waits}"
    if info.is_main:
        _store.set(key, "1")
        return
    while not _store.check([key]):  # raises once rank 0 (the store's host) is gone
        if clock_now() > deadline:  # a budget deadline: on the budget's clock
            raise RuntimeError(f"rank 0 did not finish its solo phase {_waits} by the run's deadline")
        time.sleep(POLL_S)


_released = None  # flags shared with the launcher (one per rank), when it spawned us


def share_release_flags(flags) -> None:  # noqa: ANN001  (a multiprocessing array)
    global _released
    _released = flags


def release(info: DistInfo) -> None:
    """This rank needs no peer any more (its collectives are over): the launcher may then ignore a
    peer that dies, instead of stopping this rank (rank 0 predicting alone must not be cut short)."""
    if info.enabled and _released is not None:
        _released[info.rank] = 1


def shutdown(info: DistInfo) -> None:
    global _store
    _CONTROL.pop("group", None)
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
    _store = None


def agree(info: DistInfo, stop: bool, progress: float) -> tuple[bool, float]:
    """Everyone adopts rank 0's decision and schedule position, every step. The message goes over a
    CPU (gloo) group even when the gradients go over NCCL: a broadcast of a GPU tensor is a
    host-to-device copy and two reads back per step, each a wait for the GPU."""
    if not info.enabled:
        return stop, progress
    t = torch.tensor([float(stop), progress], dtype=torch.float64)
    dist.broadcast(t, src=0, group=control_group(info))
    stop_now, position = t.tolist()  # a CPU tensor: no device involved
    return bool(stop_now), float(position)


def control_group(info: DistInfo):
    """The process group for small per-step control messages: the default one when it runs on the
    CPU (gloo), else a gloo group over the same ranks, made on first use (every rank reaches its
    first `agree` together, as new_group requires)."""
    if info.backend != "nccl":
        return None
    if "group" not in _CONTROL:
        timeout = datetime.timedelta(seconds=float(_CONTROL.get("timeout_s", 1800.0)))
        _CONTROL["group"] = dist.new_group(backend="gloo", timeout=timeout)
    return _CONTROL["group"]


def broadcast_object(info: DistInfo, obj):
    """Rank 0's value of a small picklable object, on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device(info))
    return box[0]


def sum_over_ranks(info: DistInfo, t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `t` over the ranks (every rank calls it at the same point), on t's device;
    it goes through the device the backend takes (an epoch-end message, not a per-step one)."""
    if not info.enabled:
        return t
    box = t.to(_comm_device(info))
    dist.all_reduce(box)
    return box.to(t.device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def _comm_device(info: DistInfo) -> torch.device:
    return torch.device("cuda", info.local_rank) if info.backend == "nccl" else torch.device("cpu")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def wrap(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    if not info.enabled:
        return model
    device_ids = [info.local_rank] if info.device().type == "cuda" else None
    # No buffer sync inside forward: rank 0 validates alone, and a collective inside its forward
    # would wait forever for ranks that are not running one. (Newer torch renamed the switch.)
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **no_sync)
''',
'kernelkit.core.env': r'''"""Every switch that depends on where we run (Kaggle or local) lives here.

Importing this module sets the offline flags, so it must be imported before timm.
"""
from __future__ import annotations

import os
from pathlib import Path

# timm/huggingface_hub otherwise retry a download for ~46 s before failing when internet is off.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")


def input_root() -> Path:
    """Where attached competitions and datasets are mounted (KERNELKIT_INPUT_ROOT: a test's fake tree)."""
    return Path(os.environ.get("KERNELKIT_INPUT_ROOT") or KAGGLE_INPUT)


def on_kaggle() -> bool:
    return "KAGGLE_KERNEL_RUN_TYPE" in os.environ or KAGGLE_WORKING.is_dir()


def default_out_dir() -> Path:
    return KAGGLE_WORKING if on_kaggle() else Path("outputs")


def out_dir_for(configured: str) -> Path:
    """The run's output folder: out_dir as configured, else the environment's default."""
    return Path(configured) if configured else default_out_dir()


KAGGLE_TEMP = Path("/kaggle/temp")
KAGGLE_OUTPUT_CAP_GB = 19.5  # Kaggle keeps at most 20 GB of /kaggle/working; room for its own logs


def output_cap_gb(configured: float) -> float:
    """output_cap_gb as configured, -1 resolved for where we run (0 = no cap)."""
    if configured >= 0:
        return configured
    return KAGGLE_OUTPUT_CAP_GB if on_kaggle() else 0.0


def default_cache_dir(out_dir: Path) -> Path:
    """Kaggle saves everything in /kaggle/working as output (20 GB); /kaggle/temp is scratch."""
    if on_kaggle() and KAGGLE_TEMP.is_dir():
        return KAGGLE_TEMP / "kernelkit-cache"
    return out_dir / "cache"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


MIN_VERSIONS = {"torch": (2, 1), "timm": (0, 9)}


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_versions(versions: dict[str, str]) -> None:
    """Kaggle images lag behind releases: fail at start, clearly, instead of hours later."""
    too_old = [f"{name} {versions[name]} (need >= {'.'.join(map(str, need))})"
               for name, need in MIN_VERSIONS.items() if _version_tuple(versions[name]) < need]
    if too_old:
        raise RuntimeError("package versions too old for this kernel: " + ", ".join(too_old)
                           + "; pick a newer Kaggle docker image (Settings > Environment)")
''',
'kernelkit.core.fileio': r'''"""The one atomic write: a crash or a full disk never leaves a half-written file at the final name.

Everything the kernel writes to out_dir goes through `atomic_write` (checkpoints, submission.csv,
JSON and CSV reports, .npy arrays): the bytes go to a hidden temp file beside the target, are
fsynced, then `os.replace` swaps it in. On any failure the temp file is removed and the previous
file, if any, is untouched.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

TEMP_GLOB = ".*.tmp*"  # what a killed writer can leave behind; session.remove_partial_files cleans it


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: str | Path, data: bytes | str | Callable[[Any], None]) -> Path:
    """Write `data` (bytes, text, or a function writing to a binary file object) to `path` atomically."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (not every filesystem lets a directory be fsynced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | Path, data: Any) -> Path:
    return atomic_write(path, json.dumps(data, indent=2, default=_plain) + "\n")


def write_npy(path: str | Path, array: Any) -> Path:
    """Streamed into the temp file: no in-memory copy of the bytes (100k x 15,000 probabilities are 6 GB)."""
    import numpy as np
    arr = np.asarray(array)

    def save(f: Any) -> None:
        np.save(f, arr)
    return atomic_write(path, save)


def _plain(x: Any) -> Any:
    """numpy scalars and arrays in summaries -> JSON numbers and lists."""
    if hasattr(x, "tolist"):
        return x.tolist()
    return float(x)
''',
'kernelkit.core.options': r'''"""The command line: --help built from the Config schema (groups, metavars, defaults), typed flags
(`--amp` / `--no-amp`, `--img-size auto`), `--set key=value` values at build time (`parse_value`),
and the merge defaults < preset < CONFIG block < flags (`make_config`), checked by `checks`."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import fields
from typing import Any

from .checks import MODEL_FROM_WEIGHTS, checked_config, refuse_unknown_keys
from .config import AUTO_ZERO, DURATIONS, PRESETS, TYPE_WORDS, Config, ConfigError, field_types
from .weights import resolve_weights, weights_given


def _coerce(value: str, typ: str) -> Any:
    if typ == "bool":
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    return {"int": int, "float": float, "str": str}[typ](value)


class _Typed:
    """argparse `type=`: a module-level callable (no lambda) whose name shows in error messages."""

    def __init__(self, typ: str, auto_zero: bool = False):
        self.typ, self.__name__ = typ, {"int": "integer", "float": "number", "bool": "boolean"}.get(typ, typ)
        self.auto_zero = auto_zero

    def __call__(self, value: str) -> Any:
        return 0 if self.auto_zero and value.strip().lower() == "auto" else _coerce(value, self.typ)


def parse_value(key: str, text: str, where: str = "option") -> Any:
    """One option's value from text (`--set key=value` at build time), typed as its Config field."""
    refuse_unknown_keys({key: text}, where)
    try:
        return _Typed(field_types()[key], key in AUTO_ZERO)(text)
    except ValueError:
        raise ConfigError(f"{key}={text!r}: expected {TYPE_WORDS[field_types()[key]]}") from None


class _BoolFlag(argparse.Action):
    """--amp / --no-amp, and --amp VALUE (true/false/yes/no/1/0), which scripts already use."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if option_string and option_string.startswith("--no-"):
            if values is not None:
                raise argparse.ArgumentError(self, f"takes no value (got {values!r})")
            values = False
        setattr(namespace, self.dest, True if values is None else values)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, _BoolFlag):
            return ", ".join(action.option_strings)
        return super()._format_action_invocation(action)


# --help groups: the first field of each commented group of Config; later fields follow it until the
# next group starts, so a field added inside a group lands in that group (tests check the comments).
GROUP_STARTS = {"mode": "what to run", "model": "model", "img_size": "images", "budget": "training",
                "tta": "inference", "demo_images": "demo"}


_DESCRIPTION = """\
Kaggle image-classification kernel (kernelkit): trains a timm model inside the time budget, then
writes submission.csv with test-time augmentation. Settings come from, lowest first: defaults <
--preset < the CONFIG block at the top of kernel.py < these flags.
presets: {presets}"""


_EPILOG = """\
examples:
  python kernel.py                       # the competition under /kaggle/input (else a generated demo)
  python kernel.py --preset imet2019 --pretrained-path /kaggle/input/w/model.safetensors --budget 8h
  python kernel.py --data-dir ~/data/scene15 --model resnet50 --img-size 288 --no-amp --budget 30m
  python kernel.py --mode infer --checkpoints '/kaggle/input/earlier-run/*.pt'
  python kernel.py --dry-run --preset imet2019 --budget 8h30m   # does the plan fit?

exit status: 0 submission written (also when training failed: see the log), 2 refused before
training (bad option or data), 4 --dry-run plan does not fit, other: no submission could be made"""


def _help_text(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    if f.name == "preset":
        text = f"{text.split(' (')[0]}: {' | '.join(PRESETS)}"
    default = ("on" if f.default else "off") if isinstance(f.default, bool) else repr(f.default)
    # argparse %-formats help strings: a literal % (as in "2% + 2s") must be doubled.
    return f"{text} (default {default})".replace("%", "%%")


_METAVARS = {"int": "N", "float": "X", "str": "TEXT", "preset": "NAME", "model": "NAME", "model2": "NAME",
             **dict.fromkeys(("data_dir", "out_dir", "checkpoints", "pretrained_path", "pretrained_path2",
                              "cache_dir", "resume_from"), "PATH")}


def _add_option(group: argparse._ArgumentGroup, f: dataclasses.Field, typ: str) -> None:
    flag = f"--{f.name.replace('_', '-')}"
    if typ == "bool":
        group.add_argument(flag, f"--no-{flag[2:]}", dest=f.name, default=None, nargs="?", action=_BoolFlag,
                           type=_Typed("bool"), help=_help_text(f))
        return
    choices = f.metadata.get("choices")
    metavar = None if choices else _METAVARS.get(f.name) or ("TIME" if f.name in DURATIONS else _METAVARS[typ])
    group.add_argument(flag, dest=f.name, default=None, help=_help_text(f), type=_Typed(typ, f.name in AUTO_ZERO),
                       choices=choices, metavar=metavar)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=_DESCRIPTION.format(presets=" | ".join(PRESETS)), epilog=_EPILOG,
                                formatter_class=_HelpFormatter,
                                usage="%(prog)s [--preset NAME] [--option VALUE ...]  (--help lists them)")
    types = field_types()
    group = p.add_argument_group("options")
    for f in fields(Config):
        if f.name in GROUP_STARTS:
            group = p.add_argument_group(GROUP_STARTS[f.name])
        _add_option(group, f, types[f.name])
        if f.name == "checkpoints":
            group.add_argument("--dry-run", action="store_true",
                               help="short local run that measures speed and says whether the plan fits the "
                                    "budget (exit 4 when not)")
    return p


def make_config(block: dict[str, Any] | None = None, argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Merge defaults, the named preset, the CONFIG block and command-line flags, in that order.

    Raises ConfigError (argparse errors exit with status 2 themselves) before anything is imported
    or read that takes time.
    """
    args = build_parser().parse_args(argv)
    cli = {k: v for k, v in vars(args).items() if v is not None and k in Config.__dataclass_fields__}
    block = dict(block or {})
    refuse_unknown_keys(block, "CONFIG block")
    preset = cli.get("preset", block.get("preset", ""))
    merged: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose from {' | '.join(sorted(PRESETS))}")
        merged.update(PRESETS[preset])
    merged.update(block)
    merged.update(cli)
    return checked_config(with_weights_defaults(merged, {**block, **cli})), args


# Fine-tuning from weights (pretrained_path set or found), for the options neither the user nor the
# preset set. A pretrained net converges in a few epochs, so autopick wants 4, not 10, and its sizes
# run from a quarter of the weights' input size (at least autopick.FINETUNE_FLOOR, or the device's floor
# for thumbnails; at most their own size) up to it (autopick.ladder); progressive resizing is
# off (issue #20: its half-size stages put a pretrained net at 32 px; --img-size 128 --resize-start 0
# by hand took F2 from 0.627 to 0.728); cosine as fine-tuning recipes use; single-label adds label
# smoothing 0.1 (components.label_smoothing). Compared on CPU with EfficientNet-Lite0 in
# bench/bench_finetune.py.
FINETUNE: dict[str, Any] = dict(auto_min_epochs=4, resize_start=0.0, schedule="cosine")


def with_weights_defaults(merged: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """`merged` plus the fine-tuning recipe where weights are given. `user`: what the CONFIG block and
    the command line set (those always win). A weights folder the user gave while a preset names
    another model: the folder's architecture wins unless the user named a model too."""
    path = str(merged.get("pretrained_path", ""))
    if not weights_given(path):
        return merged
    out = dict(merged)
    if "pretrained_path" in user and "model" not in user and merged.get("model", "auto") not in MODEL_FROM_WEIGHTS:
        try:
            if resolve_weights(path).architecture:
                out["model"] = "auto"
        except ValueError:
            pass  # the checks name the problem
    for key, value in FINETUNE.items():
        out.setdefault(key, value)
    return out
''',
'kernelkit.core.progress': r'''"""tqdm that stays readable in Kaggle's log, where every carriage-return refresh becomes a line."""
from __future__ import annotations

import sys
from typing import Iterable

from tqdm.auto import tqdm


class _LineWriter:
    """Turns tqdm's '\\r'-refreshes into whole lines, so a non-tty log gets one clean line each."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        s = s.replace("\r", "").strip()
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(it: Iterable, desc: str = "", total: int | None = None, log_every_s: float = 30.0, **kw) -> tqdm:
    if sys.stderr.isatty():
        return tqdm(it, desc=desc, total=total, dynamic_ncols=True, **kw)
    # Kaggle/CI logs: loops shorter than `log_every_s` print nothing (the caller logs a summary),
    # longer ones print a line every `log_every_s`.
    return tqdm(it, desc=desc, total=total, mininterval=log_every_s, delay=log_every_s, ascii=True,
                ncols=100, file=_LineWriter(sys.stdout), **kw)
''',
'kernelkit.core.stopping': r'''"""SIGTERM and SIGINT are requests to finish, not to die.

`timeout`, `docker stop`, schedulers and notebook shutdowns send SIGTERM some seconds before
SIGKILL. The handler only sets a flag: the training loop stops at its next step, prediction drops
to one TTA view, and the kernel writes its submission and exits 0. A second SIGINT (Ctrl-C twice)
interrupts for real.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator

from .clock import now as clock_now

log = logging.getLogger("kernelkit")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self.at = 0.0

    def request(self, name: str) -> None:
        if not self.requested:
            self.requested, self.signal_name, self.at = True, name, clock_now()

    def _handle(self, signum: int, frame) -> None:  # noqa: ANN001  (signal handler signature)
        if self.requested and signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.request(signal.Signals(signum).name)
        # Logged from the handler: the user must see at once that the signal was heard.
        log.warning("%s received: finishing early (stop training, predict, write the submission, exit 0)",
                    self.signal_name)


@contextlib.contextmanager
def handle_signals() -> Iterator[StopFlag]:
    """Install the handlers for the duration of a run (main thread only; elsewhere the flag just
    stays down), and put the previous ones back after."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, flag._handle)
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def ignore_in_worker(worker_id: int = 0) -> None:
    """Loader workers leave signals to the main process: a Ctrl-C or a group SIGTERM must not kill
    them under the main process's feet while it is still predicting. (torch's workers exit on
    their own when the main process dies.)"""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
''',
'kernelkit.core.storage': r'''"""What the run will write, checked against the output cap and the free disk before anything is written.

Kaggle saves everything in /kaggle/working as the kernel's output and keeps at most 20 GB of it; a
run that passes that loses its output. best.pt and last.pt hold the optimizer (convnext_tiny:
319 MB each) and an atomic write briefly holds a third copy, so the checkpoints are planned first
and the image cache, when it lives in the output folder, gets what is left.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError

log = logging.getLogger("kernelkit")

GB = 1e9
KAGGLE_OUTPUT_CAP_GB = 19.5  # of the 20 GB Kaggle keeps: room for the logs Kaggle writes itself
CHECKPOINT_COPIES = 3  # best.pt, last.pt, and the temporary file of the one being written


def checkpoint_bytes(n_params: int, ema: bool) -> int:
    """float32 weights + AdamW's two moments (+ the EMA's copy); buffers and metadata are small."""
    return int(n_params * 4 * (3 + int(ema)) * 1.02) + 1_000_000


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def folder_bytes(folder: Path, skip: Path | None = None) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        if skip is not None and _inside(Path(dirpath), skip):
            dirnames[:] = []
            continue
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


@dataclass
class StoragePlan:
    cap_bytes: int  # 0: no cap
    fixed_bytes: int  # checkpoints, inference weights, small files, what out_dir already holds
    cache_wanted_bytes: int
    cache_allowed_bytes: int
    cache_in_output: bool
    free_bytes: int

    def describe(self) -> str:
        cap = f"cap {self.cap_bytes / GB:.2f} GB" if self.cap_bytes else "no cap"
        where = "in the output folder" if self.cache_in_output else "outside the output"
        return (f"storage plan: checkpoints and outputs ~{self.fixed_bytes / GB:.2f} GB + image cache "
                f"{self.cache_allowed_bytes / GB:.2f} of {self.cache_wanted_bytes / GB:.2f} GB wanted ({where}); "
                f"{cap}, {self.free_bytes / GB:.1f} GB free")


def plan_storage(out_dir: Path, cache_root: Path, *, n_params: int, ema: bool, n_images: int, n_outputs: int,
                 img_size: int, cache_max_gb: float, cap_gb: float) -> StoragePlan:
    """Raises ConfigError when the checkpoints alone cannot fit the cap or the free disk.

    n_outputs: floats written per run besides the checkpoints (test and validation probabilities)."""
    cache_in_output = _inside(cache_root, out_dir)
    fixed = (CHECKPOINT_COPIES * checkpoint_bytes(n_params, ema) + 4 * n_params + 4 * n_outputs + 1_000_000
             + folder_bytes(out_dir, skip=cache_root if cache_in_output else None))
    wanted = n_images * 3 * img_size * img_size
    allowed = min(wanted, int(cache_max_gb * GB)) if cache_max_gb else wanted
    cap = int(cap_gb * GB)
    free = shutil.disk_usage(out_dir).free
    if cap and fixed > cap:
        raise ConfigError(f"the checkpoints need ~{fixed / GB:.2f} GB ({CHECKPOINT_COPIES} x "
                          f"{checkpoint_bytes(n_params, ema) / GB:.2f} GB, {n_params / 1e6:.1f}M parameters) but "
                          f"output_cap_gb={cap_gb:g}; raise the cap, or pick a smaller model")
    if fixed > free:
        raise ConfigError(f"the checkpoints need ~{fixed / GB:.2f} GB but {out_dir} has {free / GB:.2f} GB free")
    if cap and cache_in_output:
        allowed = min(allowed, cap - fixed)
    if cache_in_output or _same_disk(out_dir, cache_root):
        allowed = min(allowed, free - fixed)
    return StoragePlan(cap, fixed, wanted, max(0, allowed), cache_in_output, free)


def _same_disk(a: Path, b: Path) -> bool:
    b = next((p for p in [b, *b.parents] if p.exists()), b)
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return True


def remove_cache_from_output(cache_root: Path, out_dir: Path) -> None:
    """On Kaggle a cache in /kaggle/working would be saved as output (and count against its 20 GB)."""
    if cache_root.is_dir() and _inside(cache_root, out_dir):
        shutil.rmtree(cache_root, ignore_errors=True)
        log.info("removed the image cache %s so it is not saved as output", cache_root)
''',
'kernelkit.core.weights': r'''"""Pretrained weights as people attach them: a file, or a timm / Hugging Face folder.

Public "timm weights" datasets and Kaggle Models hold the folder `timm.models.save_for_hf` writes:
config.json (architecture, num_classes, pretrained_cfg with the model's mean/std) beside
model.safetensors or pytorch_model.bin, often under /kaggle/input/<model>/pytorch/<variation>/<version>/.
Reading the folder here needs only json and pathlib, so a wrong path is refused at start, before
torch or timm are imported.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
WEIGHT_EXTS = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
MAX_DEPTH = 4  # <model>/pytorch/<variation>/<version>/
# pretrained_cfg keys that would send timm to the network (hub ids, URLs) instead of our file.
_SOURCE_KEYS = ("source", "hf_hub_id", "hf_hub_filename", "hf_hub_revision", "url", "file", "state_dict")


@dataclass(frozen=True)
class WeightsSource:
    file: Path
    architecture: str = ""  # from config.json; "" for a bare file
    num_classes: int = 0  # the classifier size of the weights (0: unknown, timm's default applies)
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)

    def overlay(self) -> dict[str, Any]:
        """timm `pretrained_cfg_overlay`: the folder's own config, pointing at the local file.
        Works on timm 0.9, which has no `local-dir:` model names."""
        cfg = {k: v for k, v in self.pretrained_cfg.items() if k not in _SOURCE_KEYS}
        if self.num_classes:
            cfg["num_classes"] = self.num_classes
        return {**cfg, "file": str(self.file)}


def _config_dirs(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        if len(Path(dirpath).relative_to(folder).parts) >= MAX_DEPTH:
            dirnames[:] = []
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if "config.json" in filenames and any(n in filenames for n in WEIGHT_NAMES):
            found.append(Path(dirpath))
    return found


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str) or not cfg["architecture"]:
        raise ValueError(f"{path}: no 'architecture' entry, so this is not a timm model folder "
                         "(timm.models.save_for_hf writes one); set model= and point pretrained_path at the weights file")
    return cfg


def _bare_file(folder: Path) -> Path:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_EXTS)
    if len(files) == 1:
        return files[0]
    what = f"several weights files {[p.name for p in files]}" if files else "no config.json and no weights file"
    raise ValueError(f"pretrained_path={str(folder)!r}: {what}; point it at one file, or at a timm folder "
                     f"(config.json + {WEIGHT_NAMES[0]} or {WEIGHT_NAMES[1]})")


def resolve_weights(path: str | Path) -> WeightsSource:
    """A weights file, or the timm folder at or below `path`; ValueError names what is wrong."""
    path = Path(path)
    if path.is_file():
        return WeightsSource(path)
    if not path.is_dir():
        raise ValueError(f"pretrained_path={str(path)!r} does not exist; attach the weights (a dataset or a "
                         "Kaggle Model) and point to the file or its folder")
    dirs = _config_dirs(path)
    if len(dirs) > 1:
        raise ValueError(f"pretrained_path={str(path)!r} holds several timm model folders "
                         f"{[str(d) for d in dirs[:5]]}; point it at one of them")
    if not dirs:
        return WeightsSource(_bare_file(path))
    cfg = _read_config(dirs[0])
    file = next(dirs[0] / n for n in WEIGHT_NAMES if (dirs[0] / n).is_file())
    pretrained_cfg = cfg.get("pretrained_cfg") if isinstance(cfg.get("pretrained_cfg"), dict) else {}
    num_classes = cfg.get("num_classes", pretrained_cfg.get("num_classes", 0))
    return WeightsSource(file, cfg["architecture"], int(num_classes or 0), pretrained_cfg)


NO_WEIGHTS = "none"  # pretrained_path=none: random init, and no search of the attached inputs


def weights_given(path: str) -> bool:
    """pretrained_path names weights (not empty, not 'none')."""
    return bool(path) and path.strip().lower() != NO_WEIGHTS


def same_architecture(a: str, b: str) -> bool:
    """'convnext_tiny' and 'convnext_tiny.fb_in22k' are one architecture (the tag names weights)."""
    return a.split(".")[0] == b.split(".")[0]


def fixed_size_architecture(name: str) -> bool:
    """Whether timm's registry marks architecture `name` as taking only its own input size (ViT, DeiT,
    Swin: their patch embedding asserts on any other), which input_mode rect's rectangles cannot feed."""
    if not name or name == "auto":
        return False
    try:
        import timm
        cfg = timm.models.get_pretrained_cfg(name.split(".")[0])
    except Exception:  # noqa: BLE001  (an unknown name is reported by the model build, not here)
        return False
    return bool(getattr(cfg, "fixed_input_size", False))


SEARCH_DEPTH = 7  # /kaggle/input/models/<owner>/<model>/pytorch/<variation>/<version>/
SEARCH_MAX_ENTRIES = 200  # a folder with more entries is data (images), not a folder of attachments


def _listing(folder: Path) -> tuple[list[Path], set[str]]:
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return [], set()
    files = {e.name for e in entries if e.is_file()}
    if len(entries) > SEARCH_MAX_ENTRIES:
        return [], files
    return sorted(Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")), files


def _is_timm_folder(folder: Path, files: set[str]) -> bool:
    if "config.json" not in files or not any(n in files for n in WEIGHT_NAMES):
        return False
    try:
        _read_config(folder)
        return True
    except ValueError:  # a transformers config or other JSON: not weights we can build
        return False


def find_weights_folders(root: Path, skip: Path | None = None) -> list[Path]:
    """Every timm weights folder (config.json naming an architecture + a weights file) at most
    SEARCH_DEPTH levels below `root` (Kaggle Models under models/<owner>/<model>/pytorch/..., datasets
    holding a save_for_hf folder), sorted; `skip` (the competition) is not searched. Image folders
    (many entries) are not descended into, so the search stays fast on big inputs."""
    found: list[Path] = []
    level = [Path(root)]
    for _ in range(SEARCH_DEPTH + 1):
        nxt = []
        for folder in level:
            if skip is not None and folder == skip:
                continue
            dirs, files = _listing(folder)
            if _is_timm_folder(folder, files):
                found.append(folder)
                continue
            nxt.extend(dirs)
        level = nxt
    return sorted(found)


def weights_lines(model: str, pretrained_path: str, found: tuple[Path, ...] | None, training: bool) -> list[str]:
    """What a run fine-tunes from, said first in the log. `found`: the attached weights folders the
    search found (None: no search ran)."""
    if found and len(found) == 1:
        return [f"weights: found attached timm weights {found[0]} ({model}): fine-tuning from them "
                "(pretrained_path=none trains from scratch)"]
    if found:
        return [f"weights: found {len(found)} attached timm weights folders; autopick ranks them by speed: "
                + ", ".join(str(f) for f in found)]
    if weights_given(pretrained_path):
        return [f"weights: fine-tuning {model} from {pretrained_path}"]
    if training and pretrained_path != NO_WEIGHTS:
        searched = "none found among the attached inputs; " if found is not None else ""
        return [f"weights: {searched}training {model} from random init. Pretrained weights would help a lot: "
                "attach a timm ImageNet model (a Kaggle Model, or a dataset with its save_for_hf folder); "
                "on Kaggle it is found and fine-tuned without settings"]
    return []
''',
'kernelkit.data': r'''"""Pixels to batches: robust decoding (`images`), the uint8 image cache (`cache`), per-image and
per-batch transforms and TTA views (`transforms`), datasets, loaders and the device feeder
(`loaders`), class-balanced sampling (`sampling`) and folds (`folds`). Imports from `core`."""
''',
'kernelkit.data.cache': r'''"""Pre-resized image cache: decode every image once to the working geometry, then read uint8 rows.

Layout: `<root>/<size>px-<key>/` holding

    images.u8   uint8 memmap (n_cached, size, size, 3): rows of images.load_resized's output, stored
                channels-last (HWC), so a row is read as a channels-last (3, size, size) tensor,
                which the random crop resizes ~1.5x faster and ThreadLoader stacks with one memcpy
    ok.npy      bool (n_cached,): False for an unreadable file (its row is the blank grey image)
    bad.txt     one line per unreadable file: why
    meta.json   written last; a directory without a valid one is not a cache

The key hashes the geometry (size, pad_aspect, fill), the decoder version and the file list
(paths, and by default each file's size and mtime), so another size, pad setting, file list or
a changed file never reuses a stale cache. A build writes into a hidden temporary directory that
is renamed into place only once its data, flags and metadata are on disk: a build killed at any
point leaves no directory that looks complete (the leftover is removed by the next build).

Rows are written by DataLoader workers (spawn-safe: module-level classes, no lambdas) straight
into the pixel file (pwrite at the row's offset), so no pixels cross process boundaries during
the build. At 256 px a row
is 192 KiB: 109k iMet images take 21.5 GB, more than /kaggle/working's 20 GB. `max_bytes` (and
the free disk space) bound the cache; images beyond what fits are left out of it and decoded on
the fly, with a warning saying so.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..core.clock import now as clock_now
from ..core.progress import progress
from ..core.stopping import ignore_in_worker
from .images import RECT, RECT_FORMAT, DECODER_VERSION, BadImage, blank_image, column_rows, load_rect, load_resized, load_tiles, tv_jpeg_decoder

log = logging.getLogger("kernelkit")

CACHE_FORMAT = 2  # 2: NHWC rows
DATA, OK, BAD, META = "images.u8", "ok.npy", "bad.txt", "meta.json"
FREE_DISK_MARGIN = 1 << 30  # leave 1 GiB free for checkpoints and the submission
MAX_LOGGED_BAD = 50

Geometry = Sequence  # (size, pad_aspect, fill[, tiles]), e.g. EvalTransform(...).geometry


def _geometry(geometry: Geometry) -> tuple[int, float, int, int]:
    size, pad_aspect, fill, *rest = geometry
    return int(size), float(pad_aspect), int(fill), int(rest[0]) if rest else 1


def cache_key(paths: Sequence[str], geometry: Geometry, stat_files: bool = True) -> str:
    """Hex digest of everything the cached pixels depend on."""
    size, pad_aspect, fill, tiles = _geometry(geometry)
    what = {"format": CACHE_FORMAT, "decoder": DECODER_VERSION, "size": size, "pad_aspect": pad_aspect,
            "fill": fill, "n": len(paths)}
    if tiles != 1:  # only then (tiles, or RECT): square caches keep the keys they had before tiles existed
        what["tiles"] = tiles
    if tiles == RECT:  # the buckets and the packing, whatever pad_aspect says (rect ignores it)
        what.update(rect=RECT_FORMAT, pad_aspect=0.0)
    h = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
    for p in paths:
        h.update(str(p).encode("utf-8", "surrogateescape") + b"\0")
        if stat_files:
            try:
                st = os.stat(p)
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(b"missing")
        h.update(b"\n")
    return h.hexdigest()[:24]


def cache_dir(root: str | Path, geometry: Geometry, key: str) -> Path:
    return Path(root) / f"{_geometry(geometry)[0]}px-{key}"


class ImageCache:
    """Read side of a complete cache. Picklable for DataLoader workers: the memmap is opened
    lazily in each process and never pickled. `subset(indices)` gives a view for a split."""

    def __init__(self, directory: str | Path, meta: dict, ok: np.ndarray, index: np.ndarray | None = None):
        self.dir = Path(directory)
        self.meta = meta
        self.size = int(meta["size"])
        self.tiles = int(meta.get("tiles", 1))
        self.geometry = (self.size, float(meta["pad_aspect"]), int(meta["fill"]), self.tiles)
        self.row_shape = (column_rows(self.size, self.tiles), self.size, 3)  # a square, a column of tiles, a rect
        self.n_cached = int(meta["n_cached"])
        self.ok_rows = ok
        self.index = np.arange(int(meta["n"]), dtype=np.int64) if index is None else np.asarray(index, np.int64)
        self._mm = None

    # -- opening
    @classmethod
    def open(cls, directory: str | Path, key: str | None = None) -> "ImageCache | None":
        """The cache in `directory` if it is complete and (when given) has this key, else None."""
        d = Path(directory)
        try:
            meta = json.loads((d / META).read_text())
            if meta.get("format") != CACHE_FORMAT or (key is not None and meta.get("key") != key):
                return None
            n_cached, size, tiles = int(meta["n_cached"]), int(meta["size"]), int(meta.get("tiles", 1))
            ok = np.load(d / OK)
            if ok.shape != (n_cached,) or (d / DATA).stat().st_size != n_cached * 3 * size * column_rows(size, tiles):
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return cls(d, meta, ok.astype(bool))

    def subset(self, indices) -> "ImageCache":
        """A view whose item j is this cache's item indices[j] (e.g. the train or validation split)."""
        view = ImageCache(self.dir, self.meta, self.ok_rows, self.index[np.asarray(indices, np.int64)])
        return view

    # -- reading
    def __len__(self) -> int:
        return len(self.index)

    def has(self, i: int) -> bool:
        return bool(self.index[i] < self.n_cached)

    @property
    def ok(self) -> np.ndarray:
        """Per item: True readable, False unreadable (items beyond the cached rows count as readable
        here: they are decoded on the fly)."""
        rows = self.index
        out = np.ones(len(rows), bool)
        inside = rows < self.n_cached
        out[inside] = self.ok_rows[rows[inside]]
        return out

    def _images(self) -> np.ndarray:
        if self._mm is None:
            self._mm = np.memmap(self.dir / DATA, dtype=np.uint8, mode="r",
                                 shape=(self.n_cached, *self.row_shape))
        return self._mm

    def get(self, i: int) -> tuple[torch.Tensor, bool]:
        """(uint8 (3, H, W) tensor at row_shape (channels-last strides), readable?) of item i; requires has(i)."""
        row = int(self.index[i])
        return torch.from_numpy(np.array(self._images()[row])).permute(2, 0, 1), bool(self.ok_rows[row])

    def all_cached(self, items: np.ndarray | None = None) -> bool:
        """Are `items` (default: every item) all in the cached rows? False for none."""
        rows = self.index if items is None else self.index[items]
        return len(rows) > 0 and bool((rows < self.n_cached).all())

    def gather(self, items: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Copy the rows of `items` (all cached) into `out` (len(items), *row_shape) uint8 with one
        numpy take (no per-image Python work; numpy drops the GIL for the copy); -> readable flags."""
        rows = self.index[items]
        np.take(self._images(), rows, axis=0, out=out)
        return self.ok_rows[rows]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_mm"] = None
        return state

    def __repr__(self) -> str:
        return (f"ImageCache({str(self.dir)!r}, {len(self)} items, {self.n_cached} rows cached, "
                f"{int((~self.ok_rows).sum())} unreadable)")


# ----------------------------------------------------------------------------- building
class CacheWriter(Dataset):
    """Decodes item i into row i of the pixel file at `data_path`; yields (i, ok, message).
    Rows are written with pwrite (no page faults in this process: ~5x cheaper than a memmap)."""

    def __init__(self, paths: Sequence[str], geometry: Geometry, data_path: str):
        self.paths, self.geometry, self.data_path = list(paths), _geometry(geometry), str(data_path)
        self._fd = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, bool, str]:
        size, pad_aspect, fill, tiles = self.geometry
        if self._fd is None:
            self._fd = os.open(self.data_path, os.O_WRONLY | getattr(os, "O_BINARY", 0))
        try:
            if tiles == RECT:
                x = load_rect(self.paths[i], size, fill)
            elif tiles > 1:
                x = load_tiles(self.paths[i], size, tiles, fill)
            else:
                x = load_resized(self.paths[i], size, pad_aspect, fill)
            ok, msg = True, ""
        except BadImage as e:
            x, ok, msg = blank_image(size, tiles), False, str(e)
        row = np.ascontiguousarray(x.permute(1, 2, 0).numpy())  # HWC; no copy for channels-last x
        _write_at(self._fd, memoryview(row).cast("B"), i * row.nbytes)
        return i, ok, msg

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"] = None
        return state


class BuildStopped(Exception):
    """The build was abandoned: a stop request (SIGTERM), its deadline passed, or no disk room for one image."""


def _write_at(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        if hasattr(os, "pwrite"):
            n = os.pwrite(fd, buf, offset)
        else:  # pragma: no cover (Windows)
            os.lseek(fd, offset, os.SEEK_SET)
            n = os.write(fd, buf)
        buf, offset = buf[n:], offset + n


def collate_status(batch: list) -> list:
    return batch


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _allocate(path: Path, nbytes: int) -> None:
    """Reserve the pixel file's blocks up front: a full disk then fails here with a clear
    OSError instead of killing a worker with SIGBUS halfway through writing the memmap."""
    with open(path, "wb") as f:
        if nbytes and hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(f.fileno(), 0, nbytes)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise OSError(e.errno, f"cannot reserve {nbytes / 1e9:.2f} GB for the image cache at {path}: "
                                           f"{e.strerror}") from e
        f.truncate(nbytes)


def _remove_stale_builds(root: Path) -> None:
    """Temporary directories of builds whose process is gone (killed) are removed."""
    for d in root.glob(".*.tmp-*"):
        try:
            pid = int(d.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid():
            alive = False  # our own leftover from an interrupted build: nothing is writing it now
        else:
            try:
                os.kill(pid, 0)
                alive = True
            except ProcessLookupError:
                alive = False
            except OSError:
                alive = True
        if not alive:
            shutil.rmtree(d, ignore_errors=True)


def open_cache(paths: Sequence[str], geometry: Geometry, root: str | Path,
               stat_files: bool = True) -> ImageCache | None:
    """The complete cache for exactly these files and geometry under `root`, or None."""
    key = cache_key(paths, geometry, stat_files)
    return ImageCache.open(cache_dir(root, geometry, key), key)


def _rows_that_fit(root: Path, n: int, per: int, max_bytes: int) -> int:
    room = shutil.disk_usage(root).free - FREE_DISK_MARGIN
    if max_bytes:
        room = min(room, max_bytes)
    n_fit = int(max(0, min(n, room // per)))
    if n_fit < n:
        log.warning("image cache: room for %d of %d images (%.1f GB needed, %.1f GB allowed); the other %d "
                    "are decoded every time they are used", n_fit, n, n * per / 1e9, max(room, 0) / 1e9, n - n_fit)
    return n_fit


def _decode_into(writer: CacheWriter, num_workers: int, mp_context: str, batch_size: int, desc: str,
                 stop, deadline: float) -> tuple[np.ndarray, list[str], float]:
    """Decode every image into its row -> (ok per row, messages of the bad ones, steady decode rate)."""
    ok = np.zeros(len(writer), bool)
    bad: list[str] = []
    tv_jpeg_decoder()  # import torchvision's decoder once here; forked workers inherit it
    kwargs = {}
    if num_workers > 0 and mp_context:
        kwargs["multiprocessing_context"] = mp_context
    loader = DataLoader(writer, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_status, worker_init_fn=ignore_in_worker if num_workers else None,
                        **kwargs)
    t_first, n_after = None, 0
    for batch in progress(loader, desc=desc, total=len(loader)):
        if stop is not None and stop.requested:
            raise BuildStopped(f"image cache build stopped by {stop.signal_name}")
        if deadline and clock_now() > deadline:
            raise BuildStopped("image cache build abandoned: it would take more than its share of the budget")
        if t_first is None:
            t_first = clock_now()
        else:
            n_after += len(batch)
        for i, good, msg in batch:
            ok[i] = good
            if not good:
                bad.append(msg)
                if len(bad) <= MAX_LOGGED_BAD:
                    log.warning("unreadable image (kept with ok=0): %s", msg)
    # decode rate after the first batch (worker start-up excluded), for benchmarks and planning
    steady = round(n_after / max(clock_now() - t_first, 1e-9), 1) if t_first else 0.0
    return ok, bad, steady


def _write_index(tmp: Path, ok: np.ndarray, bad: list[str], meta: dict) -> None:
    np.save(tmp / OK, ok)
    (tmp / BAD).write_text("".join(m + "\n" for m in bad))
    (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
    for name in (OK, BAD, META):
        _fsync(tmp / name)
    _fsync(tmp, directory=True)


def _publish(tmp: Path, final: Path, key: str) -> None:
    """Move a finished build into place; a concurrent builder that finished first wins."""
    if final.exists() and ImageCache.open(final, key) is None:
        shutil.rmtree(final)  # an incomplete or foreign directory in the way
    try:
        os.rename(tmp, final)
    except OSError:
        if ImageCache.open(final, key) is None:  # not a concurrent builder that finished first
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync(final.parent, directory=True)


def build_cache(paths: Sequence[str], geometry: Geometry, root: str | Path, *, num_workers: int = 0,
                mp_context: str = "", max_bytes: int = 0, stat_files: bool = True, batch_size: int = 8,
                desc: str = "image cache", stop=None, deadline: float = 0.0) -> ImageCache:
    """Open the cache for `paths` at `geometry` under `root`, building it first if needed.

    geometry: (size, pad_aspect, fill), e.g. `EvalTransform(...).geometry`. max_bytes: upper
    bound on the pixel file (0 = only the free disk space, minus 1 GiB, bounds it). `stop`
    (stopping.StopFlag): when it is raised the build is abandoned with BuildStopped, nothing kept;
    likewise when the wall clock passes `deadline` (clock_now() value; 0 = none), and when the disk
    has no room for a single image (an empty cache is no speed-up).
    """
    t0 = clock_now()
    geometry = _geometry(geometry)
    size = geometry[0]
    key = cache_key(paths, geometry, stat_files)
    final = cache_dir(root, geometry, key)
    found = ImageCache.open(final, key)
    if found is not None:
        log.info("image cache: reusing %s (%d images, %d unreadable)", final, len(found), int((~found.ok_rows).sum()))
        return found
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root)
    if deadline and clock_now() > deadline:  # checked per batch below too, but 0 rows make 0 batches
        raise BuildStopped("image cache build abandoned: its share of the budget was spent before it began")
    per = 3 * size * column_rows(size, geometry[3])
    n, n_fit = len(paths), _rows_that_fit(root, len(paths), per, max_bytes)
    if n_fit == 0:  # an empty cache would only add a lookup per image
        raise BuildStopped("image cache: no disk room for a single image")
    tmp = root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        data_path = tmp / DATA
        _allocate(data_path, n_fit * per)
        writer = CacheWriter(list(paths)[:n_fit], geometry, str(data_path))
        ok, bad, steady = _decode_into(writer, num_workers, mp_context, batch_size, desc, stop, deadline)
        writer.close()
        _fsync(data_path)
        _write_index(tmp, ok, bad, {"format": CACHE_FORMAT, "key": key, "n": n, "n_cached": n_fit, "size": size,
                                    "layout": "NHWC", "pad_aspect": geometry[1], "fill": geometry[2],
                                    "tiles": geometry[3],
                                    "decoder": DECODER_VERSION, "bad": len(bad), "build_s": round(clock_now() - t0, 3),
                                    "steady_images_per_s": steady, "created": clock_now()})
        _publish(tmp, final, key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cache = ImageCache.open(final, key)
    if cache is None:
        raise RuntimeError(f"image cache at {final} unreadable right after building it")
    dt = clock_now() - t0
    if len(bad) > MAX_LOGGED_BAD:
        log.warning("... and %d more unreadable images, all listed in %s", len(bad) - MAX_LOGGED_BAD, final / BAD)
    log.info("image cache: %d images at %d px in %.1fs (%.0f/s), %d unreadable, %.2f GB in %s",
             n_fit, size, dt, n_fit / max(dt, 1e-9), len(bad), n_fit * per / 1e9, final)
    return cache
''',
'kernelkit.data.folds': r'''"""K-fold splits that keep label frequencies equal across folds, and out-of-fold predictions.

- `iterative_stratified_folds`: multi-label (N, C) 0/1 targets, the iterative stratification of
  Sechidis, Tsoumakas & Vlahavas, "On the Stratification of Multi-Label Data" (ECML PKDD 2011),
  as the iMet 2019 kernels used it. A random split leaves iMet's rare labels (1103 of them, many
  with a handful of images) missing from some folds; this one gives every fold its share of each.
- `stratified_folds`: single-label (N,) class indices.
- `make_folds`: picks one of the two by the targets' shape.
- `save_oof` / `load_oof`: each fold's validation probabilities as .npy files, assembled into one
  (N, C) array for threshold search and ensembling.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..core.fileio import write_npy

log = logging.getLogger("kernelkit")


def _check_k(n: int, k: int) -> None:
    if k < 2:
        raise ValueError(f"k={k}: need at least 2 folds")
    if k > n:
        raise ValueError(f"k={k} folds for {n} images: every fold needs at least one image")


def _rows_to_labels(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices) of the positive labels of each row (CSR), so the work scales with the
    number of labels present (iMet: ~4 per image), not with N x C."""
    rows, cols = np.nonzero(targets)  # row-major order: rows come sorted
    indptr = np.zeros(len(targets) + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=len(targets)), out=indptr[1:])
    return indptr, cols.astype(np.int64)


def _gather(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels of `rows`, flattened, and for each the position in `rows` it came from."""
    lens = indptr[rows + 1] - indptr[rows]
    owner = np.repeat(np.arange(len(rows)), lens)
    # Offset of each label inside its row: global position minus the start of the row's run.
    within = np.arange(len(owner)) - np.repeat(np.cumsum(lens) - lens, lens)
    return indices[indptr[rows][owner] + within], owner


def _greedy_folds(primary: np.ndarray, secondary: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """Folds for m examples placed one at a time, each in the fold with the largest `primary`
    (ties: largest `secondary`, then random), both dropping by 1 in the chosen fold.

    One fold's keys fall with every pick (primary - t), so the sequential greedy choice is the
    merge of k falling sequences: the m largest of the k*m keys, in falling order. That turns a
    Python loop over every image into one sort per label.
    """
    k = len(primary)
    t = np.arange(m, dtype=np.float64)
    p = (primary[:, None] - t).ravel()
    s = (secondary[:, None] - t).ravel()
    fold = np.repeat(np.arange(k), m)
    order = np.lexsort((rng.random(k * m), s, p))[::-1][:m]
    return fold[order]


def iterative_stratified_folds(targets: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(N,) fold index in [0, k) for multi-label (N, C) 0/1 targets (Sechidis et al. 2011).

    Labels are handled rarest first (fewest images not yet placed): each of that label's images
    goes to the fold that still wants the most of the label, ties to the fold that wants the most
    images, then random. Images with no label at all (half of the Helsinki set) come last and fill
    the folds that are short of images, which spreads them evenly and levels the fold sizes.

    Labels come first, sizes only through ties: a fold that drew many many-label images fills its
    label quotas sooner and ends up smaller (1-5% off n/k on iMet-like targets unless unlabelled
    images level it). Deterministic for a seed; 109k x 1103 iMet-sized targets take about a second.
    """
    targets = np.asarray(targets)
    if targets.ndim != 2:
        raise ValueError(f"targets must be (N, C) 0/1, got shape {targets.shape}")
    n, c = targets.shape
    _check_k(n, k)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)  # the order in which a label's images are dealt out
    indptr, indices = _rows_to_labels(targets[perm])

    folds = np.full(n, -1, np.int64)  # by position in perm
    remaining = np.bincount(indices, minlength=c).astype(np.int64)  # unplaced images per label
    want_label = np.repeat(remaining[:, None] / k, k, axis=1)  # (C, k) desired, Sechidis' c_j^i
    want_size = np.full(k, n / k)  # desired images per fold, c_j
    # Images of each label, in perm order (CSC view), to find a label's unplaced images fast.
    by_label = np.argsort(indices, kind="stable")
    owners = np.repeat(np.arange(n), np.diff(indptr))[by_label]
    starts = np.concatenate([[0], np.cumsum(np.bincount(indices, minlength=c))])
    tiebreak = rng.random(c)

    while True:
        left = np.flatnonzero(remaining > 0)
        if not len(left):
            break
        # Rarest label first; random among equals (drawn once, so the loop stays O(C)).
        label = left[np.lexsort((tiebreak[left], remaining[left]))[0]]
        rows = owners[starts[label]:starts[label + 1]]
        rows = rows[folds[rows] < 0]
        chosen = _greedy_folds(want_label[label], want_size, len(rows), rng)
        folds[rows] = chosen
        labels, owner = _gather(indptr, indices, rows)
        remaining -= np.bincount(labels, minlength=c)
        np.subtract.at(want_label, (labels, chosen[owner]), 1.0)
        want_size -= np.bincount(chosen, minlength=k)

    empty = np.flatnonzero(folds < 0)
    if len(empty):
        folds[empty] = _greedy_folds(want_size, np.zeros(k), len(empty), rng)
    out = np.empty(n, np.int64)
    out[perm] = folds
    return out


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(N,) fold index for single-label (N,) class indices: each fold gets floor or ceil of
    count/k of every class and the fold sizes differ by at most 1. Deterministic for a seed."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be (N,) class indices, got shape {labels.shape}")
    n = len(labels)
    _check_k(n, k)
    rng = np.random.default_rng(seed)
    # Shuffle, group by class, deal the groups out round-robin: a class is one contiguous run of
    # the deal, so its images land in folds as evenly as possible, and so does the whole deal.
    shuffled = rng.permutation(n)
    dealt = shuffled[np.argsort(labels[shuffled], kind="stable")]
    out = np.empty(n, np.int64)
    out[dealt] = rng.permutation(k)[np.arange(n) % k]  # which fold gets the leftovers is random
    return out


def make_folds(targets: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(N,) fold index: stratified by class for (N,) targets, iterative stratification for (N, C)."""
    targets = np.asarray(targets)
    if targets.ndim == 1:
        return stratified_folds(targets, k, seed)
    return iterative_stratified_folds(targets, k, seed)


def _oof_paths(out_dir: Path, fold: int) -> tuple[Path, Path]:
    return out_dir / f"oof_fold{fold}_idx.npy", out_dir / f"oof_fold{fold}_probs.npy"


def save_oof(out_dir: Path, fold: int, indices: np.ndarray, probs: np.ndarray) -> Path:
    """Save one fold's validation probabilities (rows of `probs` belong to the images at
    `indices` of the full training set) as oof_fold{fold}_idx.npy + oof_fold{fold}_probs.npy.
    -> the probs file."""
    indices, probs = np.asarray(indices, np.int64), np.asarray(probs, np.float32)
    if probs.ndim != 2 or len(probs) != len(indices):
        raise ValueError(f"probs {probs.shape} must be (len(indices)={len(indices)}, C)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    idx_path, probs_path = _oof_paths(out_dir, fold)
    # Probabilities first, indices last: load_oof goes by the index files, so a fold is only
    # seen once both are complete.
    write_npy(probs_path, probs)
    write_npy(idx_path, indices)
    return probs_path


def saved_folds(out_dir: Path, n: int, num_classes: int) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Every fold saved in `out_dir`, checked against the data: (name 'oof_fold<k>', indices, probs)."""
    for idx_path in sorted(Path(out_dir).glob("oof_fold*_idx.npy")):
        probs_path = idx_path.with_name(idx_path.name.replace("_idx.npy", "_probs.npy"))
        idx, p = np.load(idx_path), np.load(probs_path)
        if p.shape != (len(idx), num_classes):
            raise ValueError(f"{probs_path}: shape {p.shape}, expected ({len(idx)}, {num_classes})")
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"{idx_path}: indices outside 0..{n - 1}; saved for another data set?")
        yield idx_path.name.replace("_idx.npy", ""), idx, p


def cover(probs: np.ndarray, covered: np.ndarray, idx: np.ndarray, p: np.ndarray, name: str) -> None:
    """Put one fold's rows into the assembled (n, C) array."""
    if covered[idx].any():
        # Two folds predicting the same image means files from different splits were mixed.
        raise ValueError(f"{name}: {int(covered[idx].sum())} images already covered by another fold")
    probs[idx], covered[idx] = p, True


def load_oof(out_dir: Path, n: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Assemble every saved fold -> (probs (n, C) float32, covered (n,) bool). Rows no fold
    covered are 0 and False in `covered`: search thresholds on probs[covered] only."""
    probs = np.zeros((n, num_classes), np.float32)
    covered = np.zeros(n, bool)
    for name, idx, p in saved_folds(out_dir, n, num_classes):
        cover(probs, covered, idx, p, name)
    log.info("out-of-fold predictions cover %d of %d images", int(covered.sum()), n)
    return probs, covered
''',
'kernelkit.data.images': r'''"""Robust, fast image decoding: any file Pillow can open becomes RGB, or a `BadImage` naming the file.

Two entry points:

* `load_rgb(path, target_size, fill)` -> PIL RGB image (the general path).
* `load_resized(path, size, pad_aspect, fill)` -> uint8 (3, size, size) tensor at the working
  geometry (see `fit_size`): the fast path used by datasets and the pre-resized cache.

How `decode_tensor` picks a decoder (measured on 2 cores with iMet-like JPEGs, see README):

* JPEG whose target is at least 2x smaller than the file in both directions (small working sizes,
  or long strips that get padded): Pillow with `draft()`, which decodes at 1/2, 1/4 or 1/8 scale in
  the DCT domain, always keeping at least `DRAFT_GAP` x the target size so the resize that follows
  still antialiases properly (Pillow's `thumbnail` uses the same gap).
* other JPEGs: torchvision's decode_jpeg op (same libjpeg-turbo, identical pixels, no PIL object,
  ~20% faster than Pillow's decode; Pillow when torchvision lacks it, see `tv_jpeg_decoder`);
* PNG and everything else: Pillow (zlib dominates; torchvision is no faster), every mode
  converted to RGB by `to_rgb`.

Resizing is `torch.nn.functional.interpolate(bilinear, antialias=True)` on uint8, which has a
vectorised CPU kernel and is 3-6x faster than Pillow's resize to 256 px; it, not decoding, is what
made the naive Pillow path slow.
"""
from __future__ import annotations

import functools
import io
import math
import os
import struct
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

# Kaggle images can be huge (iMet up to 7351 x 5314); allow them but keep a bound against bombs.
Image.MAX_IMAGE_PIXELS = 300_000_000

DRAFT_GAP = 2.0  # JPEG draft keeps at least this multiple of the target size
DECODER_VERSION = 1  # bump when load_resized's pixels change: pre-resized caches are keyed by it
BLANK = 128  # grey level of the placeholder for an unreadable image

_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error,
               Image.DecompressionBombWarning, Image.DecompressionBombError)


class BadImage(Exception):
    """A file that cannot be decoded; the message names the file and the reason."""


def to_rgb(img: Image.Image, fill: int = 255) -> Image.Image:
    """Convert every Pillow mode to RGB; transparent pixels become `fill` (white like the iMet seed)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        hi = float(arr.max()) or 1.0
        scale = 255.0 / (65535.0 if hi > 255 else max(hi, 255.0))
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / ((hi - lo) or 1.0) * 255.0
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (fill, fill, fill, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


# ----------------------------------------------------------------------------- reading
def read_bytes(path: str) -> bytearray:
    """The whole file (a writable buffer, so torch can wrap it without a copy); BadImage when
    the path is empty, missing, unreadable or zero bytes long."""
    if not path:
        raise BadImage("missing file (empty path)")
    try:
        with open(path, "rb") as f:
            n = os.fstat(f.fileno()).st_size
            buf = bytearray(n)
            got = f.readinto(buf)
    except FileNotFoundError:
        raise BadImage(f"{path}: missing file") from None
    except OSError as e:
        raise BadImage(f"{path}: unreadable: {type(e).__name__}: {e}") from e
    if got == 0:
        raise BadImage(f"{path}: empty file (0 bytes)")
    return buf if got == n else buf[:got]


def open_image(data: bytes | bytearray, path: str = "") -> Image.Image:
    """Pillow image with only the header read. Refuses non-images and decompression bombs
    (more than Image.MAX_IMAGE_PIXELS pixels) with a BadImage naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImage(f"{path}: image too large, refused as a possible decompression bomb "
                       f"(limit {Image.MAX_IMAGE_PIXELS} pixels): {e}") from e
    except Image.UnidentifiedImageError as e:
        raise BadImage(f"{path}: not an image file ({len(data)} bytes, starts with {bytes(data[:8])!r})") from e
    except _PIL_ERRORS as e:
        raise BadImage(f"{path}: truncated or corrupt file (cannot read the header): {type(e).__name__}: {e}") from e


def _finish(img: Image.Image, path: str, fill: int) -> Image.Image:
    """EXIF orientation, full decode, RGB; decoding errors (truncated data...) become BadImage."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = ImageOps.exif_transpose(img)
            img.load()
            return to_rgb(img, fill)
    except _PIL_ERRORS as e:
        fmt = img.format or "image"
        raise BadImage(f"{path}: truncated or corrupt {fmt}: {type(e).__name__}: {e}") from e


def load_rgb(path: str, target_size: int = 0, fill: int = 255) -> Image.Image:
    """Open, apply EXIF orientation, convert to RGB.

    `target_size` lets JPEG decode at a reduced scale (draft) when the image is much larger than
    needed; it never goes below twice the target so quality is kept for the resize that follows.
    """
    img = open_image(read_bytes(path), path)
    if target_size and img.format == "JPEG" and min(img.size) > 4 * target_size:
        img.draft("RGB", (2 * target_size, 2 * target_size))
    return _finish(img, path, fill)


# ----------------------------------------------------------------------------- geometry
def fit_size(w: int, h: int, size: int, pad_aspect: float = 2.0) -> tuple[int, int]:
    """Size (w, h) of the content inside the `size` x `size` output: the whole square for ordinary
    images (stretched), the long side fitted for images whose long/short ratio exceeds
    `pad_aspect` (the rest is padding, iMet seed). pad_aspect=0 always stretches."""
    if pad_aspect and max(w, h) / max(1, min(w, h)) > pad_aspect:
        scale = size / max(w, h)
        return max(1, round(w * scale)), max(1, round(h * scale))
    return size, size


def fit_strip(w: int, h: int, size: int, tiles: int) -> tuple[int, int]:
    """Size (w, h) of the content in tiles mode: the short side at `size`, so objects keep their
    scale; an image longer than `tiles` squares is shrunk until its long side is `tiles * size`."""
    short, long = min(w, h), max(w, h)
    scale = min(size / max(1, short), tiles * size / max(1, long))
    return max(1, round(w * scale)), max(1, round(h * scale))


def tile_offsets(length: int, size: int, tiles: int) -> list[int]:
    """Starts of `tiles` windows of `size` spread evenly over `length` (first at 0, last at the end);
    they overlap when the image is shorter than `tiles` squares (a square image repeats)."""
    span = max(0, length - size)
    return [round(span * k / (tiles - 1)) for k in range(tiles)] if tiles > 1 else [span // 2]


def to_tiles(x: torch.Tensor, size: int, tiles: int, fill: int = 255) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, tiles * size, size), channels-last: the image at `fit_strip`'s
    scale (the short side padded with `fill` when it was shrunk below `size`), cut into `tiles`
    squares along its long side, stacked top to bottom. A column, not a 4-D tensor, so the cache,
    the loaders and collate handle it like any image; `transforms.fold_tiles` splits batches of them."""
    h, w = x.shape[-2:]
    nw, nh = fit_strip(w, h, size, tiles)
    y = resize_tensor(channels_last(x), nh, nw)
    if min(nw, nh) < size:  # longer than `tiles` squares: shrunk, so the short side needs padding
        ph, pw = max(nh, size), max(nw, size)
        canvas = torch.full((ph, pw, 3), fill, dtype=torch.uint8).permute(2, 0, 1)
        top, left = (ph - nh) // 2, (pw - nw) // 2
        canvas[:, top:top + nh, left:left + nw] = y
        y, nh, nw = canvas, ph, pw
    out = torch.empty((tiles * size, size, 3), dtype=torch.uint8).permute(2, 0, 1)
    along_w = nw >= nh
    for k, o in enumerate(tile_offsets(max(nw, nh), size, tiles)):
        out[:, k * size:(k + 1) * size] = y[:, :, o:o + size] if along_w else y[:, o:o + size, :]
    return out


# input_mode rect: every image at the pixel count of one `size` square, in the shape of the nearest of
# these aspect ratios (long / short, either orientation). A 1:5 strip keeps 2.2x the scale a padded
# square leaves it and a square frame keeps all of its own, at one square's compute; batches are
# grouped by shape (sampling.BucketBatchSampler), so the network sees whole rectangles.
RECT_ASPECTS = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0)
RECT_STEP = 8  # bucket sides are multiples of this
RECT_TAG = (0x52, 0x43)  # "RC": a packed column ends with this tag and the image's height and width
RECT_FORMAT = 1  # in the cache key: a change to the buckets or the packing never reuses an old cache
RECT = 0  # the `tiles` of a rect geometry (size, pad_aspect, fill, tiles): no squares, one rectangle


def rect_bucket(w: int, h: int) -> int:
    """The bucket of a w x h image: k >= 0 for landscape (aspect RECT_ASPECTS[k]), -k for portrait."""
    r = max(w, h) / max(1, min(w, h))
    k = min(range(len(RECT_ASPECTS)), key=lambda i: abs(math.log(RECT_ASPECTS[i] / r)))
    return k if w >= h else -k


@functools.lru_cache(maxsize=4096)
def rect_shape(bucket: int, size: int) -> tuple[int, int]:
    """(h, w) of `bucket` at working size `size`: sides in RECT_STEPs, about size * size pixels in the
    bucket's aspect ratio, and always a shape whose own bucket is this one (a batch's shape names its
    bucket: BatchNorm's statistics and progressive resizing read it from there)."""
    a, k = RECT_ASPECTS[abs(bucket)], abs(bucket)
    short = max(RECT_STEP, RECT_STEP * round(size / math.sqrt(a) / RECT_STEP))
    long = max(short, RECT_STEP * round(size * math.sqrt(a) / RECT_STEP))
    if rect_bucket(long, short) == k:
        return (short, long) if bucket >= 0 else (long, short)
    # rounding put the shape nearer another bucket's aspect (small sizes): the nearest shape that is not
    near = [(s, lg) for s in range(max(RECT_STEP, short - 2 * RECT_STEP), short + 3 * RECT_STEP, RECT_STEP)
            for lg in range(max(s, long - 4 * RECT_STEP), long + 5 * RECT_STEP, RECT_STEP) if rect_bucket(lg, s) == k]
    if near:
        short, long = min(near, key=lambda sl: abs(math.log(sl[0] * sl[1] / size ** 2)) + abs(math.log(sl[1] / sl[0] / a)))
    return (short, long) if bucket >= 0 else (long, short)


def rect_rows(size: int) -> int:
    """Rows of the (3, rows, size) column that stores a rect image (cache rows have one fixed size):
    room for the largest bucket and the 2-pixel shape tag."""
    most = max(h * w for h, w in (rect_shape(b, size) for b in range(len(RECT_ASPECTS))))
    return -(-(most + 2) // size)


def column_rows(size: int, tiles: int) -> int:
    """Rows of the uint8 (3, rows, size) column one image is stored in: `tiles` squares, or rect_rows."""
    return rect_rows(size) if tiles == RECT else max(1, tiles) * size


def to_rect(x: torch.Tensor, size: int, fill: int = 255) -> torch.Tensor:
    """uint8 (3, H, W) -> the packed column (`pack_rect`) of the image resized to its bucket's shape;
    an image longer than the last bucket keeps its aspect ratio, fitted and padded with `fill`."""
    h, w = x.shape[-2:]
    bh, bw = rect_shape(rect_bucket(w, h), size)
    if max(w, h) / max(1, min(w, h)) <= RECT_ASPECTS[-1] * 1.1:
        return pack_rect(resize_tensor(channels_last(x), bh, bw), size)
    return pack_rect(letterbox(x, bh, bw, fill), size)


def pack_rect(y: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, h, w) -> uint8 (3, rect_rows(size), size), channels-last: the image's HWC bytes first,
    its shape in the last two pixels. A fixed-size column, so the cache, the loaders and collate
    store and move it like a square; `unpack_rect` gives the image back without a copy."""
    h, w = y.shape[-2:]
    out = torch.zeros((rect_rows(size), size, 3), dtype=torch.uint8)
    flat = out.view(-1)
    if h * w * 3 + 6 > flat.numel():
        raise ValueError(f"a {h} x {w} image does not fit the rect column of size {size}")
    flat[:h * w * 3] = y.permute(1, 2, 0).reshape(-1)
    flat[-6:] = torch.tensor([*RECT_TAG, h >> 8, h & 255, w >> 8, w & 255], dtype=torch.uint8)
    return out.permute(2, 0, 1)


def unpack_rect(x: torch.Tensor) -> torch.Tensor:
    """A column of `pack_rect` -> its uint8 (3, h, w) image, channels-last (a view of the column's memory)."""
    flat = x.permute(1, 2, 0).reshape(-1)
    tag = flat[-6:].tolist()
    if tuple(tag[:2]) != RECT_TAG:
        raise ValueError("not a packed rect column")
    h, w = tag[2] << 8 | tag[3], tag[4] << 8 | tag[5]
    return flat[:h * w * 3].view(h, w, 3).permute(2, 0, 1)


def is_padded(w: int, h: int, pad_aspect: float) -> bool:
    return bool(pad_aspect) and max(w, h) / max(1, min(w, h)) > pad_aspect


def draft_scale(w: int, h: int, tw: int, th: int, gap: float = DRAFT_GAP) -> int:
    """The JPEG DCT scale (1, 2, 4, 8) Pillow's draft would pick keeping >= gap x the target."""
    s = min(w // max(1, int(np.ceil(tw * gap))), h // max(1, int(np.ceil(th * gap))))
    for sc in (8, 4, 2):
        if s >= sc:
            return sc
    return 1


def resize_tensor(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """uint8 (3, H, W) -> (3, h, w), bilinear with antialiasing (the vectorised uint8 kernel)."""
    if x.shape[-2] == h and x.shape[-1] == w:
        return x
    # (3, H, W) -> (1, 3, H, W) via HWC, so that a channels-last x stays recognisably channels-last
    # (x.unsqueeze(0) gives the batch dim stride 3, and interpolate then answers in NCHW).
    x4 = x.permute(1, 2, 0).unsqueeze(0).permute(0, 3, 1, 2)
    return F.interpolate(x4, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """(3, H, W) with HWC memory: what decoders produce, and the layout the fast uint8 resize,
    the cache rows and `data.collate_images` use; no copy when x already is."""
    return x if x.stride(0) == 1 else x.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def resize_or_pad_tensor(x: torch.Tensor, size: int, pad_aspect: float = 2.0, fill: int = 255) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, size, size) with channels-last memory: stretch, or fit the long
    side and pad the short side with `fill` when the aspect ratio exceeds `pad_aspect` (same
    offsets as the Pillow `transforms.resize_or_pad`)."""
    h, w = x.shape[-2:]
    if fit_size(w, h, size, pad_aspect) == (size, size):
        return channels_last(resize_tensor(channels_last(x), size, size))
    return letterbox(x, size, size, fill)


def letterbox(x: torch.Tensor, out_h: int, out_w: int, fill: int = 255) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, out_h, out_w), channels-last: fitted inside, aspect kept, centred on `fill`."""
    h, w = x.shape[-2:]
    scale = min(out_w / max(1, w), out_h / max(1, h))
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    out = torch.full((out_h, out_w, 3), fill, dtype=torch.uint8).permute(2, 0, 1)
    top, left = (out_h - nh) // 2, (out_w - nw) // 2
    out[:, top:top + nh, left:left + nw] = resize_tensor(channels_last(x), nh, nw)
    return out


# ----------------------------------------------------------------------------- tensor decoding
_TV_JPEG: list = []  # [decoder or None], resolved on first use


def tv_jpeg_decoder():
    """torchvision's libjpeg-turbo decoder as `f(uint8 bytes tensor) -> RGB (3, H, W)` with EXIF
    orientation applied, or None when unavailable. The op is called directly: the Python
    wrapper warns on every call that torchvision's decoders are deprecated (0.29) in favour of
    TorchCodec. It is probed once on a tiny JPEG, so a torchvision without it (or with another
    signature) sends every JPEG through Pillow instead of failing."""
    if not _TV_JPEG:
        _TV_JPEG.append(_probe_tv_jpeg())
    return _TV_JPEG[0]


def _tv_decode(data: torch.Tensor, mode: int) -> torch.Tensor:
    return torch.ops.image.decode_jpeg(data, mode, True)  # (input, mode, apply_exif_orientation)


def _probe_tv_jpeg():
    try:
        import torchvision.io  # noqa: F401  (loads the image extension)
        from torchvision.io import ImageReadMode
        decoder = functools.partial(_tv_decode, mode=ImageReadMode.RGB.value)
        buf = io.BytesIO()
        Image.new("RGB", (8, 6), (200, 30, 60)).save(buf, "JPEG")
        probe = decoder(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
        ok = tuple(probe.shape) == (3, 6, 8) and abs(int(probe[0, 3, 3]) - 200) < 8
        return decoder if ok else None
    except Exception:
        return None


def decode_tensor(path: str, size: int = 0, pad_aspect: float = 2.0, fill: int = 255, tiles: int = 1) -> torch.Tensor:
    """Decode to an RGB uint8 (3, H, W) tensor (channels-last memory), EXIF orientation applied.

    With `size`, a JPEG much larger than its target (see `fit_size`) is decoded at reduced scale
    (H, W are then smaller than the file's); the caller resizes to the target anyway.
    """
    data = read_bytes(path)
    img = open_image(data, path)
    scale = 1
    if img.format == "JPEG" and size:
        w, h = img.size
        scale = draft_scale(w, h, *(fit_strip(w, h, size, tiles) if tiles > 1 else fit_size(w, h, size, pad_aspect)))
    if img.format == "JPEG" and scale == 1 and tv_jpeg_decoder() is not None:
        try:
            return tv_jpeg_decoder()(torch.frombuffer(data, dtype=torch.uint8))  # channels-last strides
        except RuntimeError:
            pass  # truncated, corrupt or unusual: Pillow decodes it or explains what is wrong
    if scale > 1:
        w, h = img.size
        img.draft("RGB", (-(-w // scale), -(-h // scale)))
    rgb = _finish(img, path, fill)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


def load_resized(path: str, size: int, pad_aspect: float = 2.0, fill: int = 255) -> torch.Tensor:
    """File -> uint8 (3, size, size) at the working geometry. The deterministic part of every
    transform, and exactly what the pre-resized cache stores."""
    return resize_or_pad_tensor(decode_tensor(path, size, pad_aspect, fill), size, pad_aspect, fill)


def load_tiles(path: str, size: int, tiles: int, fill: int = 255) -> torch.Tensor:
    """File -> uint8 (3, tiles * size, size) (see `to_tiles`): tiles mode's deterministic part."""
    return to_tiles(decode_tensor(path, size, 0.0, fill, tiles), size, tiles, fill)


def load_rect(path: str, size: int, fill: int = 255) -> torch.Tensor:
    """File -> the packed rect column (`to_rect`): rect mode's deterministic part."""
    return to_rect(decode_tensor(path, size, 0.0, fill), size, fill)


def blank_image(size: int, tiles: int = 1) -> torch.Tensor:
    """Placeholder for an unreadable file, so batch shapes stay fixed (channels-last like the rest);
    tiles RECT: a grey square packed as a rect column."""
    if tiles == RECT:
        h, w = rect_shape(0, size)
        return pack_rect(torch.full((h, w, 3), BLANK, dtype=torch.uint8).permute(2, 0, 1), size)
    return torch.full((tiles * size, size, 3), BLANK, dtype=torch.uint8).permute(2, 0, 1)
''',
'kernelkit.data.loaders': r'''"""Datasets and loaders. Bad files never stop a run: they become a blank image with ok=0."""
from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler
from torch.utils.data._utils.collate import default_collate

from ..core.stopping import ignore_in_worker
from .images import BadImage, blank_image, load_rgb, resize_tensor, tv_jpeg_decoder
from .sampling import BucketBatchSampler, ShardedBatches
from .transforms import seed_augmentations

log = logging.getLogger("kernelkit")


class ImageDataset(Dataset):
    """(uint8 CHW image, target, ok). `ok` is 0 for an unreadable file so the loss can ignore it
    while batch shapes stay fixed and every test id still gets a prediction.

    With a kernelkit transform (one with `load`/`augment`, e.g. EvalTransform, TrainTransform)
    images are decoded by the fast tensor path; any other callable gets a PIL RGB image.
    `cache` (cache.ImageCache, or a `.subset(...)` of one, aligned with `paths`) serves the
    deterministic part from the pre-resized cache; the transform's random part still runs on it.
    """

    def __init__(self, paths: list[str], targets: np.ndarray | None, transform: Callable,
                 size: int, fill: int = 255, cache=None):
        self.paths, self.targets, self.transform = list(paths), targets, transform
        self.size, self.fill = size, fill
        self.cache = cache
        if cache is not None:
            if len(cache) != len(self.paths):
                raise ValueError(f"cache holds {len(cache)} images, dataset {len(self.paths)}")
            geometry = getattr(transform, "geometry", None)
            if geometry is None or (*geometry, 1)[:4] != tuple(cache.geometry):  # (3-tuples: square)
                raise ValueError(f"cache geometry {cache.geometry} does not match the transform's {geometry}")

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> tuple[torch.Tensor, bool]:
        """(transformed uint8 image, readable?) for item i."""
        if self.cache is not None and self.cache.has(i):
            x, ok = self.cache.get(i)  # unreadable files were named in the log when the cache was built
            return (self.transform(x), True) if ok else (self.blank(), False)
        try:
            if hasattr(self.transform, "load"):
                return self.transform(self.transform.load(self.paths[i])), True
            return self.transform(load_rgb(self.paths[i], self.size, self.fill)), True
        except BadImage as e:
            log.warning("bad image skipped: %s", e)
            return self.blank(), False

    def blank(self) -> torch.Tensor:
        """The placeholder of an unreadable file, shaped like the transform's output (tiles: a column)."""
        blank = getattr(self.transform, "blank", None)
        return blank() if blank is not None else blank_image(self.size)

    def batch(self, indices: list[int], pin_memory: bool = False) -> list | None:
        """The whole batch in one gather from the cache, as collate_images would stack it, when every
        item is cached and the transform adds nothing per image (aug none: the augmentation runs on
        the GPU; evaluation). None otherwise: the caller builds the batch item by item."""
        if self.cache is None or getattr(self.transform, "per_image_work", True):
            return None
        items = np.asarray(indices, dtype=np.int64)
        if not self.cache.all_cached(items):
            return None
        # Gathered straight into page-locked memory, so the copy to the GPU needs no staging copy.
        out = torch.empty((len(items), *self.cache.row_shape), dtype=torch.uint8, pin_memory=pin_memory)
        ok = torch.from_numpy(self.cache.gather(items, out.numpy()).astype(np.float32))
        if self.targets is None:
            targets = torch.zeros(len(items))
        else:
            t = self.targets[items]
            targets = torch.as_tensor(t, dtype=torch.float32 if t.ndim > 1 else torch.long)
        return [out.permute(0, 3, 1, 2), targets, ok]

    def __getitem__(self, i: int):
        img, ok = self.image(i)
        if self.targets is None:
            target = torch.zeros(())
        else:
            t = self.targets[i]
            target = torch.as_tensor(t, dtype=torch.float32 if np.ndim(t) else torch.long)
        return img, target, torch.tensor(1.0 if ok else 0.0)


def split_indices(targets: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified for single-label targets, random for multi-label; both sides non-empty."""
    n = len(targets)
    rng = np.random.default_rng(seed)
    if val_fraction <= 0 or n < 2:
        return np.arange(n), np.arange(0)
    if targets.ndim == 1:
        val = []
        for c in np.unique(targets):
            idx = rng.permutation(np.flatnonzero(targets == c))
            k = int(round(len(idx) * val_fraction))
            val.extend(idx[:k] if len(idx) > 1 else [])
        val = np.array(sorted(val), dtype=np.int64)
    else:
        perm = rng.permutation(n)
        val = np.sort(perm[:max(1, int(round(n * val_fraction)))])
    mask = np.ones(n, bool)
    mask[val] = False
    return np.flatnonzero(mask), val


def fully_cached(ds: Dataset) -> bool:
    cache = getattr(ds, "cache", None)
    return cache is not None and cache.all_cached()


def make_loader(ds: Dataset, batch_size: int, train: bool, num_workers: int, mp_context: str = "",
                pin_memory: bool = False, seed: int = 0, sampler=None, threads: bool | None = None,
                buckets: np.ndarray | None = None, shard: tuple[int, int] = (1, 0)):
    """`sampler` (e.g. DistributedSampler) replaces the loader's own shuffling. `buckets` (one per
    item, input_mode rect): every batch holds one bucket (sampling.BucketBatchSampler), in the order
    of the sampler underneath; `shard` (world_size, rank): this rank's share of those batches (the
    sampler must then shuffle alike on every rank).

    threads: build batches with `num_workers` threads in this process (ThreadLoader) instead of
    worker processes. None = yes when every item comes from the pre-resized cache: then the
    per-image work is a row copy plus cheap augmentation, and worker processes would spend
    most of their time shipping batches through shared memory (measured 10x slower, README).
    """
    if threads is None:
        threads = fully_cached(ds)
    if not threads and num_workers > 0:
        tv_jpeg_decoder()  # import torchvision's decoder once here; forked workers inherit it
    g = torch.Generator()
    g.manual_seed(seed)
    batch_sampler = None
    if buckets is not None:
        if sampler is None:
            sampler = RandomSampler(ds, generator=g) if train else SequentialSampler(ds)
        batch_sampler = BucketBatchSampler(sampler, buckets, batch_size, min_last=2 if train else 1)
        if shard[0] > 1:
            batch_sampler = ShardedBatches(batch_sampler, *shard, seed=seed)
    if threads:
        return ThreadLoader(ds, batch_size, shuffle=train and sampler is None, drop_last=train and len(ds) > batch_size,
                            num_threads=max(1, num_workers), sampler=sampler, generator=g, pin_memory=pin_memory,
                            batch_sampler=batch_sampler)
    kwargs = {}
    if num_workers > 0:
        # Persistent workers: under spawn each worker re-imports torch (seconds), once per run is enough.
        kwargs.update(persistent_workers=True, prefetch_factor=4)
        if mp_context:
            kwargs["multiprocessing_context"] = mp_context
    if batch_sampler is not None:
        return DataLoader(ds, batch_sampler=batch_sampler, num_workers=num_workers, pin_memory=pin_memory,
                          generator=g, worker_init_fn=seed_worker, collate_fn=collate_images, **kwargs)
    return DataLoader(ds, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      drop_last=train and len(ds) > batch_size, num_workers=num_workers, pin_memory=pin_memory,
                      generator=g, worker_init_fn=seed_worker, collate_fn=collate_images, **kwargs)


def set_epoch(loader, epoch: int) -> None:
    """A new shuffle per epoch where the sampler takes one (DistributedSampler, directly or under the
    bucketed batches of rect)."""
    for sampler in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            return


def loader_tiles(loader) -> int:
    """Squares per image in the batches of `loader` (what `transforms.fold_tiles` splits): the tile
    count of its dataset's transform, 1 for anything else (pad, squeeze, rect)."""
    tiles = getattr(getattr(getattr(loader, "dataset", None), "transform", None), "tiles", 1)
    return tiles if isinstance(tiles, int) and tiles > 1 else 1


def loader_order(loader) -> np.ndarray | None:
    """The dataset index of each row a pass over `loader` yields, when batches do not follow the
    dataset's order (rect buckets); None when they do."""
    order = getattr(getattr(loader, "batch_sampler", None), "order", None)
    return np.asarray(order(), dtype=np.int64) if callable(order) else None


def seed_worker(worker_id: int) -> None:
    """Each worker its own augmentation stream, derived from the loader's seeded generator (so
    runs repeat); signals are left to the main process, which finishes the run on SIGTERM."""
    import random
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    seed_augmentations(seed)
    ignore_in_worker()


def is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 3 and x.stride(0) == 1 and x.shape[0] > 1


def collate_images(batch: list):
    """default_collate, except that channels-last images (rows of the cache, and what the random
    crop makes of them) are stacked as NHWC with one memcpy each, giving an (N, 3, H, W) batch in
    channels_last memory format (what channels_last models want anyway) instead of a ~20x slower
    transposing copy into NCHW."""
    first = batch[0][0]
    if not (isinstance(first, torch.Tensor) and is_channels_last(first)):
        return default_collate(batch)
    batch = same_shape(batch)
    first = batch[0][0]
    c, h, w = first.shape
    out = None
    if torch.utils.data.get_worker_info() is not None:
        # In a worker process, stack straight into shared memory, as default_collate does.
        try:
            storage = first._typed_storage()._new_shared(len(batch) * c * h * w, device=first.device)
            out = first.new(storage).resize_(len(batch), h, w, c)
        except (AttributeError, RuntimeError):
            out = None
    images = torch.stack([b[0].permute(1, 2, 0) for b in batch], out=out).permute(0, 3, 1, 2)
    return [images, *default_collate([tuple(b[1:]) for b in batch])]


def same_shape(batch: list) -> list:
    """Items whose image is not in the batch's most common shape resized to it: in rect mode an
    unreadable file's blank square, or a file whose header and pixels disagree on its shape, joins a
    batch of another bucket (a slightly stretched image rather than a lost batch)."""
    shapes = [tuple(b[0].shape) for b in batch]
    if len(set(shapes)) == 1:
        return batch
    _, h, w = max(set(shapes), key=shapes.count)
    return [b if tuple(b[0].shape[-2:]) == (h, w) else (resize_tensor(b[0], h, w), *b[1:]) for b in batch]


class ThreadLoader:
    """A DataLoader for cheap items: batches are built by a pool of threads in this process, a few
    batches ahead, with no pickling and no shared-memory transfer. Row copies, resizing and the
    other torch/numpy work release the GIL, so the threads run in parallel.

    Offers what the training and inference loops use of a DataLoader: len(), iteration (each
    pass reshuffles), .dataset, .batch_size, .sampler (set_epoch works), .drop_last.
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = False, drop_last: bool = False,
                 num_threads: int = 2, sampler=None, generator: torch.Generator | None = None,
                 pin_memory: bool = False, prefetch: int = 4, collate_fn: Callable | None = None,
                 batch_sampler=None):
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last
        if sampler is None:
            sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        self.sampler = sampler
        self.batch_sampler = BatchSampler(sampler, batch_size, drop_last) if batch_sampler is None else batch_sampler
        self.num_threads, self.prefetch = max(1, num_threads), max(1, prefetch)
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.collate_fn = collate_fn or collate_images
        self.generator = generator

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def _fetch(self, indices: list[int], seed: int):
        seed_augmentations(seed)  # per batch, so the result does not depend on which thread builds it
        whole = getattr(self.dataset, "batch", None)
        batch = whole(indices, self.pin_memory) if whole is not None else None
        if batch is not None:
            return [b if b.is_pinned() or not self.pin_memory else b.pin_memory() for b in batch]
        batch = self.collate_fn([self.dataset[i] for i in indices])
        if self.pin_memory:
            batch = [b.pin_memory() if isinstance(b, torch.Tensor) else b for b in batch]
        return batch

    def __iter__(self):
        batches = enumerate(iter(self.batch_sampler))
        epoch_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator).item())
        pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="kernelkit-loader")
        pending: deque = deque()
        try:
            for _ in range(self.num_threads + self.prefetch):
                item = next(batches, None)
                if item is None:
                    break
                pending.append(pool.submit(self._fetch, item[1], epoch_seed + item[0]))
            while pending:
                batch = pending.popleft().result()
                item = next(batches, None)
                if item is not None:
                    pending.append(pool.submit(self._fetch, item[1], epoch_seed + item[0]))
                yield batch
        finally:  # also when the consumer stops early (budget reached): drop what is queued
            pool.shutdown(wait=True, cancel_futures=True)


class DeviceFeeder:
    """Batches of `loader` on `device`, each copied on a side CUDA stream while the previous step
    computes, so the step never waits for a host-to-device copy (the pinned batches make the copy
    asynchronous). On a CPU device: the loader's batches unchanged. Offers len() like the loader."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.device.type != "cuda":
            yield from self.loader
            return
        stream = torch.cuda.Stream(self.device)
        batches = iter(self.loader)
        try:
            ahead = self._copy(next(batches, None), stream)
            while ahead is not None:
                torch.cuda.current_stream(self.device).wait_stream(stream)
                for t in ahead:
                    # The step's stream uses these tensors: their memory must not be reused by the
                    # caching allocator until it is done with them.
                    t.record_stream(torch.cuda.current_stream(self.device))
                current, ahead = ahead, self._copy(next(batches, None), stream)
                yield current
        finally:  # the consumer stopped early (budget reached): stop the loader's threads now
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    def _copy(self, batch, stream) -> list | None:
        if batch is None:
            return None
        with torch.cuda.stream(stream):
            return [t.to(self.device, non_blocking=True) for t in batch]
''',
'kernelkit.data.sampling': r'''"""Samplers: class-balanced sampling for long-tailed data (iNaturalist seed); batches grouped by shape
(input_mode rect)."""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from .images import rect_bucket

HEADER_THREADS = 8  # header reads wait on the disk, not the CPU


def balanced_sample_weights(targets: np.ndarray, power: float = 0.5) -> np.ndarray:
    """Per-image sampling weight ~ 1 / count(class) ** power.

    power=1 draws every class equally often, 0 is plain shuffling; 0.5 (square-root sampling) is
    the usual compromise that lifts rare classes without repeating them to overfitting. For
    multi-label targets an image counts as its rarest label; images with no label get the
    weight of the most common label, so they are not dropped.
    """
    if targets.ndim == 1:
        counts = np.bincount(targets).astype(np.float64)
        w = 1.0 / np.maximum(counts[targets], 1.0) ** power
    else:
        counts = targets.sum(0).astype(np.float64)
        per_label = np.where(targets > 0, 1.0 / np.maximum(counts, 1.0) ** power, 0.0)
        w = per_label.max(1)
        w[w == 0] = 1.0 / max(counts.max(), 1.0) ** power
    return w / w.sum()


def balanced_sampler(targets: np.ndarray, power: float = 0.5, seed: int = 0) -> torch.utils.data.Sampler:
    g = torch.Generator()
    g.manual_seed(seed)
    weights = torch.as_tensor(balanced_sample_weights(targets, power), dtype=torch.double)
    return torch.utils.data.WeightedRandomSampler(weights, num_samples=len(targets), replacement=True, generator=g)


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of indices that share a bucket (input_mode rect: one image shape per bucket), drawn in
    the order of `sampler`: each index joins its bucket's open batch, which is yielded when full, so
    buckets interleave as the sampler shuffles (the NLP bucket-by-length batching). What is left in
    each bucket at the end is yielded too, in training only when it holds at least `min_last` images
    (BatchNorm cannot train on one); any sampler works underneath (random, class-balanced, sequential).
    Data-parallel ranks share one such sequence through ShardedBatches."""

    def __init__(self, sampler, buckets: Sequence[int], batch_size: int, min_last: int = 1):
        self.sampler, self.buckets = sampler, np.asarray(buckets)
        self.batch_size, self.min_last = int(batch_size), max(1, int(min_last))

    def __iter__(self) -> Iterator[list[int]]:
        open_batches: dict[int, list[int]] = {}
        for i in self.sampler:
            batch = open_batches.setdefault(int(self.buckets[i]), [])
            batch.append(int(i))
            if len(batch) == self.batch_size:
                yield batch
                open_batches[int(self.buckets[i])] = []
        for batch in open_batches.values():
            if len(batch) >= self.min_last:
                yield batch

    def __len__(self) -> int:
        """Exact for a sampler that draws every index once (random, sequential); for one that draws
        with replacement (class-balanced), the count its buckets would give at their average share."""
        _, counts = np.unique(self.buckets, return_counts=True)
        n = len(self.sampler)
        if n != len(self.buckets):
            counts = counts * n / max(1, len(self.buckets))
        full, rest = np.divmod(np.round(counts).astype(int), self.batch_size)
        return int(full.sum() + (rest >= self.min_last).sum())

    def order(self) -> list[int]:
        """Index of each row a pass yields, in the order it yields them (a deterministic sampler's: the
        predictions of a bucketed loader go back to the dataset's order with it)."""
        return [i for batch in self for i in batch]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


class ShardedBatches(torch.utils.data.Sampler):
    """Rank `rank`'s share of a batch sequence every rank draws alike (a BucketBatchSampler over the
    same seeded shuffle): the batches shuffled once more (seeded by epoch: a bucket's leftover batch
    comes last in the sequence, and would always land on the same rank), padded to a multiple of
    world_size by repeating its first batches, then every `world_size`-th one, so every rank takes as
    many steps. A DistributedSampler cannot do this for bucketed batches: it splits the images, and each
    rank's images would fill a different number of batches (a collective hangs)."""

    def __init__(self, batches, world_size: int, rank: int, seed: int = 0):
        self.batches, self.world_size, self.rank = batches, int(world_size), int(rank)
        self.seed, self.epoch = int(seed), 0
        self.batch_size = getattr(batches, "batch_size", None)

    def __iter__(self) -> Iterator[list[int]]:
        every = list(self.batches)
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        every = [every[i] for i in torch.randperm(len(every), generator=g).tolist()]
        target = len(self) * self.world_size
        while every and len(every) < target:  # fewer batches than ranks: repeat them all
            every += every[:target - len(every)]
        return iter(every[self.rank::self.world_size])

    def __len__(self) -> int:
        return -(-len(self.batches) // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(epoch)


def rect_buckets(paths: Sequence[str]) -> np.ndarray:
    """images.rect_bucket of each file from its header (EXIF orientation applied, as decoding does);
    0 (square) for a file whose header cannot be read: it fails again when decoded and becomes a blank
    square. Headers only: reading them all costs a fraction of decoding them."""
    with ThreadPoolExecutor(HEADER_THREADS) as pool:
        return np.fromiter(pool.map(_bucket_of, paths, chunksize=64), dtype=np.int64, count=len(paths))


_SWAPPED = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees


def _bucket_of(path: str) -> int:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a decompression-bomb warning: no pixels are decoded here
            with Image.open(path) as im:
                w, h = im.size
                if im.getexif().get(0x0112) in _SWAPPED:  # any format: MPO phone photos turn too
                    w, h = h, w
        return rect_bucket(w, h)
    except Exception:  # noqa: BLE001  (any unreadable file: the loader logs it when it decodes it)
        return 0
''',
'kernelkit.data.transforms': r'''"""Image transforms: aspect handling from the iMet seed, train augmentation, the eval transform,
and batch augmentations (mixup, cutmix, flip, shift/scale/rotate, colour jitter, noise) that run
on whole batches on any device.

A transform has two stages:

* `load(path)` / `base(img)`: deterministic, to the working geometry, uint8 (3, size, size).
  This is the expensive part (decode + resize) and what the pre-resized cache stores.
* `augment(x)`: random, on the uint8 tensor (cheap: crop + resize of a size x size image, flip...).
  It runs the same way on a freshly decoded image and on one read from the cache.

`transform(img)` = `augment(base(img))` for a PIL image or a uint8 tensor. Outputs are uint8 CHW;
normalisation happens on the device (`normalize`), so workers ship 4x fewer bytes than floats.

Randomness: per-sample augmentations draw from Python's `random` (each DataLoader worker is seeded
by `data.seed_worker`); batch functions take an optional `torch.Generator` for their parameters,
so they are reproducible and run wherever the batch lives. Without one they draw on the batch's
device (its global RNG): on a GPU a parameter drawn on the CPU is one blocking upload per draw,
and a parameter read back to choose a branch (mixup's lambda, cutmix's box) is a wait for the
GPU, so nothing in a batch function reads a tensor on the host.
"""
from __future__ import annotations

import functools
import math
import random
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .images import (
    RECT,
    RECT_TAG,
    blank_image,
    channels_last,
    column_rows,
    fit_size,
    load_rect,
    load_resized,
    load_tiles,
    resize_or_pad_tensor,
    resize_tensor,
    to_rect,
    to_tiles,
    unpack_rect,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AUG_LEVELS = ("none", "flip", "light", "medium", "strong")


def resize_or_pad(img: Image.Image, size: int, pad_aspect: float = 2.0, fill: int = 255) -> Image.Image:
    """Square `size` x `size`: stretch ordinary images, pad very long/thin ones (iMet seed).

    Stretching a 1:5 strip to a square destroys it; fitting the long side and padding the short
    side keeps its content recognisable. (Pillow version; the pipeline uses the tensor twin
    `images.resize_or_pad_tensor`, which makes the same decision and the same offsets.)
    """
    w, h = img.size
    nw, nh = fit_size(w, h, size, pad_aspect)
    if (nw, nh) != (size, size):
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
        dw, dh = size - nw, size - nh
        return ImageOps.expand(img, (dw // 2, dh // 2, dw - dw // 2, dh - dh // 2), fill=(fill, fill, fill))
    return img.resize((size, size), Image.BILINEAR, reducing_gap=3.0)


def to_tensor_uint8(img: Image.Image) -> torch.Tensor:
    """PIL image -> contiguous uint8 (3, H, W)."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class EvalTransform:
    """Deterministic: resize or pad to the working size; with `tiles` > 1, `tiles` squares along the
    long side stacked as a (3, tiles * size, size) column (`images.to_tiles`); with tiles RECT, the
    image at its aspect bucket's shape, packed in a fixed-size column (`images.to_rect`) for the
    cache and unpacked to (3, h, w) when the transform is applied."""

    def __init__(self, size: int, pad_aspect: float = 2.0, fill: int = 255, tiles: int = 1):
        self.size, self.pad_aspect, self.fill, self.tiles = int(size), float(pad_aspect), int(fill), int(tiles)

    @property
    def geometry(self) -> tuple[int, float, int, int]:
        """(size, pad_aspect, fill, tiles): what `load` depends on, and what a cache is keyed by."""
        return self.size, self.pad_aspect, self.fill, self.tiles

    @property
    def rect(self) -> bool:
        return self.tiles == RECT

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of what `base` makes."""
        return column_rows(self.size, self.tiles), self.size

    def load(self, path: str) -> torch.Tensor:
        """File -> uint8 (3, H, W) at `shape`; raises images.BadImage."""
        if self.rect:
            return load_rect(path, self.size, self.fill)
        if self.tiles > 1:
            return load_tiles(path, self.size, self.tiles, self.fill)
        return load_resized(path, self.size, self.pad_aspect, self.fill)

    def base(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        """PIL image or uint8 (3, H, W) tensor -> uint8 (3, H, W) at `shape`; a tensor already at
        that shape (e.g. from the cache) passes through unchanged."""
        if isinstance(img, Image.Image):  # HWC memory, like the decoders' output
            img = torch.from_numpy(np.array(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8))
            x = img.permute(2, 0, 1)
        else:
            x = img
        if tuple(x.shape[-2:]) == self.shape and (not self.rect or is_packed_rect(x)):
            return x  # (a raw image of exactly this shape gives the same tiles: nothing to do either way)
        if self.rect:
            return to_rect(x, self.size, self.fill)
        if self.tiles > 1:
            return to_tiles(x, self.size, self.tiles, self.fill)
        return resize_or_pad_tensor(x, self.size, self.pad_aspect, self.fill)

    def blank(self) -> torch.Tensor:
        """The placeholder of an unreadable file, shaped like the transform's output (rect: unpacked)."""
        x = blank_image(self.size, self.tiles)
        return unpack_rect(x) if self.rect else x

    @property
    def per_image_work(self) -> bool:
        """False when a cached row is already the final image (a loader may then gather whole batches);
        a rect column is unpacked image by image."""
        return self.rect

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        x = self.base(img)
        return self.augment(unpack_rect(x) if self.rect else x)


class TrainTransform(EvalTransform):
    """Per-sample augmentation on the uint8 working-size tensor.

    aug: none | flip (horizontal flip) | light (flip + random resized crop) | medium (light +
    colour jitter) | strong (medium + shift/scale/rotate + Gaussian noise), the seeds'
    augmentations. On CPU the crop costs ~0.1 ms per image, jitter ~0.5 ms, shift/scale/rotate
    and noise ~1-3 ms: with few cores prefer `flip` or `light` here and the batch functions below
    (`resized_crop_batch`, `affine_batch`, `color_jitter_batch`, `noise_batch`, `mix_batch`) on
    the GPU.
    """

    def __init__(self, size: int, pad_aspect: float = 2.0, fill: int = 255, aug: str = "light", tiles: int = 1, *,
                 crop_scale: tuple[float, float] = (0.6, 1.0), crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, vflip: float = 0.0, jitter: float = 0.2, degrees: float = 15.0,
                 translate: float = 0.1, scale: tuple[float, float] = (0.9, 1.1), affine_p: float = 0.5,
                 noise_std: float = 8.0, noise_p: float = 0.5):
        super().__init__(size, pad_aspect, fill, tiles)
        if aug not in AUG_LEVELS:
            raise ValueError(f"unknown aug {aug!r}; choose {' | '.join(AUG_LEVELS)}")
        self.aug = aug
        self.crop_scale, self.crop_ratio = crop_scale, crop_ratio
        self.hflip, self.vflip, self.jitter = hflip, vflip, jitter
        self.degrees, self.translate, self.scale, self.affine_p = degrees, translate, scale, affine_p
        self.noise_std, self.noise_p = noise_std, noise_p

    @property
    def per_image_work(self) -> bool:
        return self.aug != "none" or self.rect

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiles > 1 and self.aug != "none":  # each tile on its own: a crop must not straddle two
            s = self.size
            return channels_last(torch.cat([self.augment_square(x[:, k * s:(k + 1) * s]) for k in range(self.tiles)], 1))
        return self.augment_square(x)

    def augment_square(self, x: torch.Tensor) -> torch.Tensor:
        level, rng = AUG_LEVELS.index(self.aug), aug_random()
        if level >= 2:
            h, w = x.shape[-2:] if self.rect else (self.size, self.size)  # a rect image keeps its bucket's shape
            x = random_resized_crop(x, (h, w), self.crop_scale, self.crop_ratio)
        if level >= 1:
            if rng.random() < self.hflip:
                x = x.flip(-1)
            if self.vflip and rng.random() < self.vflip:
                x = x.flip(-2)
        if level >= 4 and rng.random() < self.affine_p:
            angle = rng.uniform(-self.degrees, self.degrees)
            shift = (rng.uniform(-self.translate, self.translate), rng.uniform(-self.translate, self.translate))
            x = affine(_one(x), torch.tensor([angle]), torch.tensor([shift]),
                       torch.tensor([rng.uniform(*self.scale)]), fill=self.fill)[0]
        if level >= 3 and self.jitter:
            j = self.jitter
            x = color_jitter(_one(x), *(torch.tensor([rng.uniform(1 - j, 1 + j)]) for _ in range(3)))[0]
        if level >= 4 and rng.random() < self.noise_p:
            x = add_noise(x, self.noise_std, torch.Generator().manual_seed(rng.getrandbits(62)))
        return channels_last(x)


def is_packed_rect(x: torch.Tensor) -> bool:
    """Whether uint8 (3, H, W) ends with the tag `images.pack_rect` writes (a column from the cache)."""
    tail = x.permute(1, 2, 0).reshape(-1)[-6:-4].tolist() if x.numel() >= 6 else []
    return tuple(tail) == RECT_TAG


_local = threading.local()


def aug_random() -> random.Random:
    """The random stream of per-sample augmentations, one per thread: the threaded loader builds
    batches concurrently, and a shared stream would hand out numbers in scheduling order, so two
    runs with one seed would augment differently. Seeded per batch by the loaders."""
    rng = getattr(_local, "rng", None)
    if rng is None:
        rng = _local.rng = random.Random(random.getrandbits(64))
    return rng


def seed_augmentations(seed: int) -> None:
    _local.rng = random.Random(seed)


def _one(x: torch.Tensor) -> torch.Tensor:
    """(3, H, W) -> (1, 3, H, W) keeping channels-last memory recognisable (see images.resize_tensor)."""
    return x.permute(1, 2, 0).unsqueeze(0).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- per-sample ops
def crop_params(h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop with area fraction in `scale` and aspect in
    `ratio` (torchvision's RandomResizedCrop rule; falls back to the whole image)."""
    area, rng = h * w, aug_random()
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        r = math.exp(rng.uniform(*log_r))
        cw, ch = round(math.sqrt(target * r)), round(math.sqrt(target / r))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    return 0, 0, h, w


def random_resized_crop(x: torch.Tensor, size: int | tuple[int, int], scale=(0.6, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """uint8 (3, H, W) -> (3, size, size) (or (3, h, w) for size (h, w)): random crop, resized back
    (antialiased bilinear)."""
    h, w = (size, size) if isinstance(size, int) else size
    top, left, ch, cw = crop_params(x.shape[-2], x.shape[-1], scale, ratio)
    return resize_tensor(x[:, top:top + ch, left:left + cw], h, w)


def add_noise(x: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise with `std` in pixel levels (0..255 scale); keeps the dtype."""
    return _back(x.float() + _randn_like(x, generator) * std, x.dtype)


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (x's when None)."""
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev).to(x.device)


def _back(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float result on the 0..255 scale -> the input's dtype (rounded for uint8)."""
    y = y.clamp(0, 255)
    return y.round_().to(torch.uint8) if dtype == torch.uint8 else y.to(dtype)


# ----------------------------------------------------------------------------- batch ops
# All take images on the 0..255 scale, (N, 3, H, W) uint8 or float (e.g. `x.float()` on the GPU
# before `normalize`), and return the same dtype and device. Parameters are explicit; random ones
# are drawn from `generator` (a CPU torch.Generator, or the global RNG when None).
def _rand(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) draws on `device`: from `generator` where it lives (one copy), else from the
    device's own RNG (no copy at all)."""
    if generator is None:
        return torch.rand(n, device=device)
    return torch.rand(n, generator=generator, device=generator.device).to(device, non_blocking=True)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * _rand(n, generator, device)


def affine(x: torch.Tensor, angle: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
           fill: float = 0.0) -> torch.Tensor:
    """Rotate (degrees, counter-clockwise), shift (fraction of width/height, (N, 2)) and scale each
    image of the batch about its centre; uncovered pixels get `fill`. Bilinear."""
    n, _, h, w = x.shape
    dev = x.device
    a = angle.to(dev, torch.float32) * (math.pi / 180)
    s = scale.to(dev, torch.float32).clamp_min(1e-3)
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    # affine_grid maps output -> input coordinates in [-1, 1]; account for a non-square aspect.
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
    theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
    t = shift.to(dev, torch.float32).view(n, 2) * 2
    theta[:, 0, 2] = -(theta[:, 0, 0] * t[:, 0] + theta[:, 0, 1] * t[:, 1])
    theta[:, 1, 2] = -(theta[:, 1, 0] * t[:, 0] + theta[:, 1, 1] * t[:, 1])
    grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
    xf = x.float() - fill
    y = F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    return _back(y, x.dtype)


def color_jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                 saturation: torch.Tensor) -> torch.Tensor:
    """Per-image factors (N,) (1 = unchanged), applied as brightness, contrast, saturation."""
    dev = x.device
    b, c, s = (f.to(dev, torch.float32).view(-1, 1, 1, 1) for f in (brightness, contrast, saturation))
    y = x.to(torch.float32, copy=True).mul_(b).clamp_(0, 255)  # copy: never touch the caller's tensor
    mean = _gray(y).mean((2, 3), keepdim=True)
    y.mul_(c).add_(mean * (1 - c)).clamp_(0, 255)
    gray = _gray(y)
    y.mul_(s).add_(gray * (1 - s))
    return _back(y, x.dtype)


def _gray(y: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of float (N, 3, H, W) -> (N, 1, H, W)."""
    return (y[:, 0:1] * 0.299).add_(y[:, 1:2], alpha=0.587).add_(y[:, 2:3], alpha=0.114)


def hflip_batch(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    flip = (_rand(len(x), generator, x.device) < p).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


def affine_batch(x: torch.Tensor, degrees: float = 15.0, translate: float = 0.1,
                 scale: tuple[float, float] = (0.9, 1.1), p: float = 1.0, fill: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Random shift/scale/rotate per image (the seeds' ShiftScaleRotate), with probability p."""
    n, dev = len(x), x.device
    angle = _uniform(n, -degrees, degrees, generator, dev)
    shift = _uniform(2 * n, -translate, translate, generator, dev).view(n, 2)
    sc = _uniform(n, scale[0], scale[1], generator, dev)
    on = _rand(n, generator, dev) < p
    # torch.where, not masked assignment: a boolean index is a nonzero(), which waits for the GPU.
    return affine(x, torch.where(on, angle, 0.0), torch.where(on[:, None], shift, 0.0), torch.where(on, sc, 1.0),
                  fill)


def resized_crop_batch(x: torch.Tensor, scale: tuple[float, float] = (0.6, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3),
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Random resized crop of every image, back to the same size (bilinear): a crop with area
    fraction in `scale` and aspect ratio in `ratio`, at a random position. The batch twin of
    TrainTransform's per-sample crop, for running it on the GPU."""
    n, _, h, w = x.shape
    dev = x.device
    area = _uniform(n, scale[0], scale[1], generator, dev)
    r = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator, dev))
    cw = torch.sqrt(area * r * h / w).clamp(max=1.0)  # crop size as a fraction of the width / height,
    ch = torch.sqrt(area / r * w / h).clamp(max=1.0)  # its aspect ratio (in pixels) r
    cx = (1 - cw) * (_rand(n, generator, dev) - 0.5)  # crop centre offset, fraction of the size
    cy = (1 - ch) * (_rand(n, generator, dev) - 0.5)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 1, 1] = cw, ch
    theta[:, 0, 2], theta[:, 1, 2] = 2 * cx, 2 * cy
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    y = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return _back(y, x.dtype)


def color_jitter_batch(x: torch.Tensor, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Factors drawn uniformly from [1 - v, 1 + v] per image."""
    n, dev = len(x), x.device
    return color_jitter(x, _uniform(n, 1 - brightness, 1 + brightness, generator, dev),
                        _uniform(n, 1 - contrast, 1 + contrast, generator, dev),
                        _uniform(n, 1 - saturation, 1 + saturation, generator, dev))


def noise_batch(x: torch.Tensor, std: float = 8.0, p: float = 0.5,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise (std in pixel levels) on a random share p of the images."""
    on = (_rand(len(x), generator, x.device) < p).to(torch.float32).view(-1, 1, 1, 1)
    return _back(x.float() + _randn_like(x, generator) * (std * on), x.dtype)


# ----------------------------------------------------------------------------- mixup / cutmix
def soft_targets(y: torch.Tensor, num_classes: int = 0) -> torch.Tensor:
    """Class indices (N,) -> one-hot float (N, C); multi-hot/soft (N, C) -> float as is."""
    if y.ndim == 1:
        if num_classes <= 0:
            raise ValueError("class-index targets need num_classes to be mixed")
        # scatter, not F.one_hot: one_hot checks the range of y on the host (a wait for the GPU).
        return torch.zeros(len(y), num_classes, device=y.device).scatter_(1, y.long()[:, None], 1.0)
    return y.float()


def _beta(alpha: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """lam ~ Beta(alpha, alpha) as a 0-d tensor on `device` (G1 / (G1 + G2), Gi ~ Gamma(alpha)),
    drawn where it is used: a lambda read on the host would wait for the GPU every batch."""
    conc = torch.full((2,), float(alpha), device=generator.device if generator is not None else device)
    g = torch._standard_gamma(conc, generator=generator)
    return (g[0] / g.sum().clamp_min(1e-12)).to(device, non_blocking=True)


def _lam(lam: float | torch.Tensor | None, alpha: float, generator: torch.Generator | None,
         device: torch.device) -> torch.Tensor:
    if lam is None:
        return _beta(alpha, generator, device)
    return lam.to(device, torch.float32) if isinstance(lam, torch.Tensor) else torch.full((), float(lam), device=device)


def _partners(n: int, perm: torch.Tensor | None, generator: torch.Generator | None,
              device: torch.device) -> torch.Tensor:
    if perm is None:
        gdev = generator.device if generator is not None else device
        return torch.randperm(n, generator=generator, device=gdev).to(device, non_blocking=True)
    return perm.long().to(device)


def _mix_ok(ok: torch.Tensor | None, perm: torch.Tensor) -> torch.Tensor | None:
    """A mixed image is usable only if both its sources were readable."""
    return None if ok is None else ok * ok[perm.to(ok.device)]


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float = 0.4, num_classes: int = 0,
          ok: torch.Tensor | None = None, lam: float | torch.Tensor | None = None, perm: torch.Tensor | None = None,
          generator: torch.Generator | None = None):
    """x' = lam x + (1 - lam) x[perm], y' likewise, lam ~ Beta(alpha, alpha).

    -> (x', y' float (N, C), ok' or None). Targets: class indices (give num_classes) or
    (N, C) multi-hot. `ok` (1 = readable) is mixed as ok * ok[perm]. uint8 images are rounded.
    """
    t = soft_targets(y, num_classes)
    lam = _lam(lam, alpha, generator, x.device)
    perm = _partners(len(x), perm, generator, x.device)
    xm = _back(x.float() * lam + x[perm].float() * (1 - lam), x.dtype)
    lam_t = lam.to(t.device)
    return xm, t * lam_t + t[perm.to(t.device)] * (1 - lam_t), _mix_ok(ok, perm)


def cutmix_mask(h: int, w: int, lam: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool (h, w) on lam's device: a box of area ~ (1 - lam) h w at a random centre, clipped to the
    image. Built by comparisons, so the box never has to be read on the host to slice with it."""
    dev = lam.device
    r = (1.0 - lam).clamp_min(0.0).sqrt()
    ch, cw = (h * r).floor(), (w * r).floor()
    u = _rand(2, generator, dev)
    cy, cx = (u[0] * h).floor(), (u[1] * w).floor()
    y0, y1 = (cy - (ch / 2).floor()).clamp_min(0), (cy + ch - (ch / 2).floor()).clamp_max(h)
    x0, x1 = (cx - (cw / 2).floor()).clamp_min(0), (cx + cw - (cw / 2).floor()).clamp_max(w)
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    return ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :]


def cutmix(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0, num_classes: int = 0,
           ok: torch.Tensor | None = None, lam: float | torch.Tensor | None = None, perm: torch.Tensor | None = None,
           generator: torch.Generator | None = None):
    """Paste a box of x[perm] into x; targets mixed by the pasted area actually used.

    -> (x', y' float (N, C), ok' or None); see `mixup` for the arguments.
    """
    t = soft_targets(y, num_classes)
    lam = _lam(lam, alpha, generator, x.device)
    perm = _partners(len(x), perm, generator, x.device)
    h, w = x.shape[-2:]
    mask = cutmix_mask(h, w, lam, generator)
    xm = torch.where(mask, x[perm], x)
    kept = (1.0 - mask.float().mean()).to(t.device)  # the share of each image that stayed its own
    return xm, t * kept + t[perm.to(t.device)] * (1 - kept), _mix_ok(ok, perm)


def mix_batch(x: torch.Tensor, y: torch.Tensor, mixup_alpha: float = 0.4, cutmix_alpha: float = 1.0,
              prob: float = 1.0, switch_prob: float = 0.5, num_classes: int = 0,
              ok: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """With probability `prob` apply cutmix (probability `switch_prob`, when cutmix_alpha > 0) or
    mixup (when mixup_alpha > 0); otherwise return the batch with targets made float. The branch is
    chosen with a host random stream (augmentation's, or one seeded from `generator`), so choosing
    it never reads the device."""
    rng = aug_random() if generator is None else random.Random(
        int(torch.randint(2**62, (1,), generator=generator, device=generator.device)))
    if rng.random() < prob:
        if cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob):
            return cutmix(x, y, cutmix_alpha, num_classes, ok, generator=generator)
        if mixup_alpha > 0:
            return mixup(x, y, mixup_alpha, num_classes, ok, generator=generator)
    return x, soft_targets(y, num_classes), ok


BATCH_AUG_LEVELS = ("", "flip", "light", "medium", "strong")


class BatchAugment:
    """Augmentation of a whole batch on the training device, then mixup/cutmix.

    On Kaggle the 4 CPU cores feed the GPU; moving crop/flip/colour/affine/noise to the GPU
    (with aug='none' in the workers, or a cached dataset) frees them. Levels add up like
    TrainTransform's: flip; light = + random resized crop; medium = + colour jitter;
    strong = + shift/scale/rotate and noise, each on half the images and with `fill` outside the
    image, as TrainTransform does them. -> (x float 0-255, targets, ok).
    """

    def __init__(self, level: str = "", mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 num_classes: int = 0, fill: float = 0.0):
        if level not in BATCH_AUG_LEVELS:
            raise ValueError(f"unknown batch augmentation {level!r}; choose from {BATCH_AUG_LEVELS}")
        self.level, self.mixup_alpha, self.cutmix_alpha = level, mixup_alpha, cutmix_alpha
        self.num_classes, self.fill = num_classes, float(fill)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, ok: torch.Tensor):
        x = x.float()
        rank = BATCH_AUG_LEVELS.index(self.level)
        if rank >= 2:
            x = resized_crop_batch(x)
        if rank >= 1:
            x = hflip_batch(x)
        if rank >= 3:
            x = color_jitter_batch(x)
        if rank >= 4:
            x = noise_batch(affine_batch(x, p=0.5, fill=self.fill))
        if self.mixup_alpha > 0 or self.cutmix_alpha > 0:
            x, y, ok = mix_batch(x, y, self.mixup_alpha, self.cutmix_alpha, num_classes=self.num_classes, ok=ok)
        return x, y, ok


@dataclass(frozen=True)
class Preprocess:
    """What the model's weights expect of its input, stored in checkpoints so inference uses what
    training used. `interpolation` is recorded for other tools; our uint8 resize is bilinear with
    antialiasing whatever the weights were trained with."""
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Preprocess":
        """None (a checkpoint from before this was stored): ImageNet, what every older run used."""
        if not d:
            return IMAGENET
        return cls(tuple(map(float, d["mean"])), tuple(map(float, d["std"])), str(d.get("interpolation", "bilinear")))


IMAGENET = Preprocess()


@functools.lru_cache(maxsize=16)
def _statistics(pre: Preprocess, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) * 255 as (1, 3, 1, 1) tensors on `device`, uploaded once per device: built per
    batch they were two blocking host-to-device copies every training step and predict batch."""
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1) * 255
    return mean, std


def normalize(batch: torch.Tensor, channels_last: bool, pre: Preprocess) -> torch.Tensor:
    """uint8 NCHW on any device -> float normalised with the model's statistics (no default: a
    caller that forgot them would silently feed a 0.5/0.5 model ImageNet-normalised inputs)."""
    mean, std = _statistics(pre, batch.device)
    x = (batch.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


# ----------------------------------------------------------------------------- tiles
def fold_tiles(x: torch.Tensor, tiles: int) -> tuple[torch.Tensor, int]:
    """A batch of `tiles`-tile columns (N, 3, T * s, s) -> (N * T, 3, s, s) and T; any other batch as
    is (T = 1: squares, rect images). Image k's tiles are rows k*T .. k*T + T - 1 (what `pool_tiles`
    expects). The count comes from the loader (`loaders.loader_tiles`), not the shape: a portrait
    rect bucket can be exactly twice as tall as it is wide."""
    n, c, h, w = x.shape
    if tiles < 2 or h != tiles * w:
        return x, 1
    t = tiles
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    y = x.reshape(n, c, t, w, w).transpose(1, 2).reshape(n * t, c, w, w)
    return (y.contiguous(memory_format=torch.channels_last) if cl else y), t


def pool_tiles(logits: torch.Tensor, tiles: int) -> torch.Tensor:
    """(N * T, C) -> (N, C): each class's largest logit over an image's tiles (an object in any tile
    is in the image; iMet solutions took the max over crops). T = 1: unchanged."""
    return logits if tiles == 1 else logits.view(-1, tiles, logits.shape[-1]).amax(1)


# Test-time views: each maps a normalised batch to a view of it. Chosen by level, in this order.
def tta_identity(x: torch.Tensor) -> torch.Tensor:
    return x


def tta_hflip(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=[3])


def tta_vflip(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=[2])


def tta_hvflip(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=[2, 3])


TTA_VIEWS = (tta_identity, tta_hflip, tta_vflip, tta_hvflip)


def tta_views(level: int) -> tuple:
    if not 1 <= level <= len(TTA_VIEWS):
        raise ValueError(f"tta must be 1..{len(TTA_VIEWS)}, got {level}")
    return TTA_VIEWS[:level]
''',
'kernelkit.decide': r'''"""From probabilities to answers: metrics, decoding labels (`labels`), threshold search
(`thresholds`), the rule chosen for a run (`rules`), blending several runs (`ensemble`) and the
reports on labels and errors (`reports`). Pure numpy/pandas; imports from `core` and `data`."""
''',
'kernelkit.decide.ensemble': r'''"""Blending K-fold runs by their out-of-fold predictions (numpy only).

A *member* is one model family trained over the folds: the run folders whose stored configs agree
on everything but the fold and the run-time settings (RUNTIME_KEYS). Its out-of-fold (OOF) rows
come from all its folders' `oof/oof_fold<k>_{idx,probs}.npy`, its test probabilities are the mean
of their `test_probs.npy` (each fold model predicted the whole test set). Non-negative member
weights summing to 1 are fitted by coordinate search on the competition metric over the OOF rows
every member covers; the blend of the test probabilities uses the same weights.
"""
from __future__ import annotations

import glob
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..data.folds import cover, saved_folds

log = logging.getLogger("kernelkit")

# Settings that do not change what a model learns: runs differing only in these are folds of one member.
RUNTIME_KEYS = frozenset({
    "mode", "fold", "out_dir", "data_dir", "checkpoints", "resume", "resume_from", "sessions", "budget", "margin",
    "grace", "num_workers", "mp_context", "ddp_procs", "ddp_backend", "cache_images", "cache_dir", "cache_max_gb",
    "checkpoint_every", "deterministic", "tta", "threshold", "threshold_rule", "min_labels", "max_labels",
})
MIX_CELLS = 2 ** 22  # probabilities blended at a time (16 MB of float32 temporaries)
SEARCH_ROWS = 20000  # weight search on at most this many OOF rows (seeded sample): iMet's 109k x 1103 is slow


class BlendInputError(ValueError):
    """Inputs that cannot be blended (missing or mismatched files): named, before anything is written."""


@dataclass
class Member:
    name: str
    dirs: list[Path]
    oof: np.ndarray  # (n, C) float32; rows outside `covered` are 0
    covered: np.ndarray  # (n,) bool
    folds: dict[str, np.ndarray] = field(default_factory=dict)  # "dir/oof_fold<k>" -> its row indices
    test: np.ndarray | None = None  # (n_test, C), mean over the member's folders


def find_run_dirs(spec: str) -> list[Path]:
    """Comma-separated folders or globs -> run folders, in order, each once (a matched file stands
    for its folder, so `runs/*/test_probs.npy` works too)."""
    found: list[Path] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        matches = [Path(item)] if Path(item).exists() else [Path(p) for p in sorted(glob.glob(item))]
        if not matches:
            raise BlendInputError(f"checkpoints: {item!r} matches no folder")
        for p in matches:
            d = (p if p.is_dir() else p.parent).resolve()
            if d not in found:
                found.append(d)
    return found


def member_key(run_dir: Path) -> str:
    """What the run learned, as a string: its config without the run-time keys (the folder when it
    has no config.json)."""
    path = run_dir / "config.json"
    if not path.is_file():
        return str(run_dir)
    cfg = json.loads(path.read_text())
    return json.dumps({k: v for k, v in sorted(cfg.items()) if k not in RUNTIME_KEYS})


def group_members(dirs: list[Path]) -> list[list[Path]]:
    groups: dict[str, list[Path]] = {}
    for d in dirs:
        groups.setdefault(member_key(d), []).append(d)
    return list(groups.values())


def load_member(dirs: list[Path], n: int, num_classes: int, n_test: int) -> Member:
    """One member's OOF rows and mean test probabilities, every shape checked against the data."""
    oof, covered = np.zeros((n, num_classes), np.float32), np.zeros(n, bool)
    folds: dict[str, np.ndarray] = {}
    test_sum = None  # summed fold by fold from memory-mapped files: one (N, C) array, not one per folder
    for d in dirs:
        test_path = d / "test_probs.npy"
        try:
            files = list(saved_folds(d / "oof", n, num_classes))
            for name, idx, p in files:
                folds[f"{d.name}/{name}"] = idx
                where = f"{d / 'oof' / name} (model {', '.join(map(str, dirs))}: one folder per fold)"
                cover(oof, covered, idx, p, where)
        except ValueError as e:  # shapes or indices of another data set, a fold given twice
            raise BlendInputError(str(e)) from None
        if not files or not test_path.is_file():
            raise BlendInputError(f"{d}: a blend needs oof/oof_fold<k>_idx.npy and test_probs.npy from a run with "
                                  "fold= set (found " + ", ".join(p.name for p in d.glob("*")) + ")")
        test = np.load(test_path, mmap_mode="r")
        if test.shape != (n_test, num_classes):
            raise BlendInputError(f"{test_path}: shape {test.shape}, expected ({n_test}, {num_classes})")
        if test_sum is None:
            test_sum = np.array(test, dtype=np.float32)
        else:
            test_sum += test
    test_sum /= len(dirs)
    name = dirs[0].name if len(dirs) == 1 else f"{dirs[0].name}+{len(dirs) - 1}"
    return Member(name, dirs, oof, covered, folds, test_sum)


def mix(parts: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """The weighted sum as float32, a chunk of rows at a time: the temporaries stay chunk-sized, not (N, C)."""
    out = np.empty(parts[0].shape, np.float32)
    step = max(1, MIX_CELLS // max(out[0].size, 1)) if len(out) else 1
    for s in range(0, len(out), step):
        rows = slice(s, s + step)
        out[rows] = np.float32(weights[0]) * parts[0][rows]
        for w, p in zip(weights[1:], parts[1:]):
            out[rows] += np.float32(w) * p[rows]
    return out


def _with_weight(w: np.ndarray, i: int, value: float) -> np.ndarray:
    """w with w[i] = value, the others rescaled to share 1 - value as before (evenly if they had none)."""
    rest = np.delete(np.arange(len(w)), i)
    others = w[rest].sum()
    out = w.copy()
    out[rest] = w[rest] * (1 - value) / others if others > 0 else (1 - value) / len(rest)
    out[i] = value
    return out


def fit_weights(parts: list[np.ndarray], score: Callable[[np.ndarray], float], rounds: int = 4,
                grid: int = 21) -> tuple[np.ndarray, float]:
    """Non-negative weights summing to 1 that maximise `score(mix(parts, w))`: coordinate search from
    equal weights, each member's weight tried over a grid with the others rescaled; stops when a
    round improves nothing. -> (weights, score)."""
    w = np.full(len(parts), 1.0 / len(parts))
    best = score(mix(parts, w))
    if len(parts) == 1:
        return w, best
    for _ in range(rounds):
        improved = False
        for i in range(len(parts)):
            for value in np.linspace(0.0, 1.0, grid):
                cand = _with_weight(w, i, value)
                s = score(mix(parts, cand))
                if s > best + 1e-9:
                    best, w, improved = s, cand, True
        if not improved:
            break
    return w, best


def search_rows(rows: np.ndarray, seed: int, limit: int = SEARCH_ROWS) -> np.ndarray:
    if len(rows) <= limit:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))
''',
'kernelkit.decide.labels': r'''"""Probabilities -> class indices."""
from __future__ import annotations

from typing import Protocol

import numpy as np

DECODE_CELLS = 2 ** 22  # probabilities decoded at a time: masks and label sorts (8 bytes a cell) stay ~32 MB

class Rule(Protocol):
    """What decode needs of a thresholds.ThresholdRule (named here so decode stays a leaf)."""

    def apply(self, probs: np.ndarray) -> np.ndarray: ...


def order_and_ranks(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: class indices by falling probability, and each class's place in that order."""
    order = np.argsort(-probs, axis=1, kind="stable")  # stable: ties go to the lower class index
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(probs.shape[1]), probs.shape), axis=1)
    return order, ranks


def limit_labels(pred: np.ndarray, order: np.ndarray, ranks: np.ndarray, min_labels: int = 0,
                 max_labels: int = 0) -> np.ndarray:
    """New (N, C) bool: `pred` plus each image's top `min_labels`, then (max_labels > 0) only the
    `max_labels` most probable predicted labels kept. order/ranks from `order_and_ranks`, passed in
    so that a search trying many limits sorts once."""
    if max_labels > 0 and min_labels > max_labels:
        raise ValueError(f"min_labels ({min_labels}) > max_labels ({max_labels})")
    pred = pred | (ranks < min_labels) if min_labels > 0 else pred.copy()
    if max_labels > 0:
        # Rank among the predicted labels only: count them along each image's falling order.
        kept = np.cumsum(np.take_along_axis(pred, order, axis=1), axis=1) <= max_labels
        cap = np.empty_like(kept)
        np.put_along_axis(cap, order, kept, axis=1)
        pred &= cap
    return pred


def apply_thresholds(probs: np.ndarray, thresholds: float | np.ndarray, min_labels: int = 0,
                     max_labels: int = 0) -> np.ndarray:
    """Boolean (N, C): probs above the threshold(s) (a scalar or one per class), then per image
    the top `min_labels` added and, when max_labels > 0, only the `max_labels` most probable of
    the predicted labels kept. Both go by probability, so a per-class rule and a global one force
    or drop the same labels.
    """
    pred = probs > np.asarray(thresholds)
    if min_labels <= 0 and max_labels <= 0:
        return pred
    return limit_labels(pred, *order_and_ranks(probs), min_labels, max_labels)


def decode_multilabel(probs: np.ndarray, threshold: float, min_labels: int = 0, max_labels: int = 0) -> np.ndarray:
    """Boolean (N, C): probs above threshold, plus the top `min_labels` of each image, at most
    `max_labels` (0: no cap) of each image."""
    return apply_thresholds(probs, threshold, min_labels, max_labels)


def decode(task: str, probs: np.ndarray, threshold: float = 0.5, min_labels: int = 0,
           rule: Rule | None = None) -> list:
    """Per image: the list of label indices (multi-label) or the class index (multi-class).

    A `rule` (kernelkit.decide.thresholds.ThresholdRule) replaces `threshold` and `min_labels`.
    """
    if task == "multilabel":
        out: list = []
        rows = max(1, DECODE_CELLS // max(probs.shape[1], 1))
        for s in range(0, len(probs), rows):  # the (rows, C) masks and sorts stay chunk-sized
            chunk = probs[s:s + rows]
            pred = rule.apply(chunk) if rule is not None else decode_multilabel(chunk, threshold, min_labels)
            out.extend(np.flatnonzero(row).tolist() for row in pred)
        return out
    return probs.argmax(1).tolist()
''',
'kernelkit.decide.metrics': r'''"""Competition metrics on numpy arrays.

Multi-label metrics take (N, C) 0/1 or bool arrays of truth and prediction (for single-label data
use `one_hot`). They follow scikit-learn's definitions (tests compare them with sklearn.metrics):

- per image ('samples'), per class ('macro') or pooled ('micro') counts tp, fp, fn;
- precision = tp / (tp + fp), recall = tp / (tp + fn),
  F-beta = (1 + b^2) tp / ((1 + b^2) tp + b^2 fn + fp);
- a ratio whose denominator is 0 is `zero_division`, 1 by default (sklearn's zero_division=1):
  an image (or class) with no true and no predicted label scores F = 1, as in iMet's F2
  (`fbeta_per_image`); one with true labels but nothing predicted has precision 1, recall 0, F 0.
"""
from __future__ import annotations

import numpy as np


def fbeta_per_image(truth: np.ndarray, pred: np.ndarray, beta: float = 2.0) -> float:
    """F-beta of each image's label set, averaged over images (iMet 2019's F2).

    An image with no true and no predicted labels scores 1 (sklearn's zero_division=1).
    """
    truth, pred = truth.astype(bool), pred.astype(bool)
    tp = (truth & pred).sum(1).astype(np.float64)
    p, t = pred.sum(1), truth.sum(1)
    b2 = beta * beta
    denom = b2 * t + p
    score = np.where(denom > 0, (1 + b2) * tp / np.maximum(denom, 1), 1.0)
    return float(score.mean()) if len(score) else 0.0


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Single-label accuracy of the argmax: labels (N,) class indices, probs (N, C)."""
    return float((probs.argmax(1) == labels).mean()) if len(labels) else 0.0


def top_k_error(labels: np.ndarray, probs: np.ndarray, k: int = 1) -> float:
    """Share of images whose label is not among the k most probable classes (iNat's top-1 error)."""
    top = np.argsort(-probs, axis=1)[:, :k]
    return float(1.0 - (top == labels[:, None]).any(1).mean()) if len(labels) else 1.0


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N,) class indices -> (N, C) bool indicator."""
    out = np.zeros((len(labels), num_classes), dtype=bool)
    out[np.arange(len(labels)), labels] = True
    return out


def _bool2d(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    truth, pred = np.asarray(truth).astype(bool), np.asarray(pred).astype(bool)
    if truth.shape != pred.shape or truth.ndim != 2:
        raise ValueError(f"truth {truth.shape} and pred {pred.shape} must be the same (N, C) shape")
    return truth, pred


def _ratio(num: np.ndarray, den: np.ndarray, zero_division: float) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.where(den > 0, num / np.maximum(den, 1e-300), zero_division)


AVERAGES = ("micro", "macro", "samples")


def precision_recall_fbeta(truth: np.ndarray, pred: np.ndarray, beta: float = 1.0, average: str = "micro",
                           zero_division: float = 1.0) -> tuple[float, float, float]:
    """(precision, recall, F-beta) averaged 'micro' | 'macro' | 'samples', as
    sklearn.metrics.precision_recall_fscore_support(..., average=average, zero_division=...)."""
    truth, pred = _bool2d(truth, pred)
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    axis = {"micro": None, "macro": 0, "samples": 1}[average]
    tp = (truth & pred).sum(axis)
    fp = (~truth & pred).sum(axis)
    fn = (truth & ~pred).sum(axis)
    b2 = beta * beta
    p, r = _ratio(tp, tp + fp, zero_division), _ratio(tp, tp + fn, zero_division)
    f = _ratio((1 + b2) * tp, (1 + b2) * tp + b2 * fn + fp, zero_division)
    if np.ndim(f) and not np.size(f):
        return 0.0, 0.0, 0.0  # no images (samples) or no classes (macro): nothing to average
    return float(np.mean(p)), float(np.mean(r)), float(np.mean(f))


def precision_score(truth: np.ndarray, pred: np.ndarray, average: str = "micro", zero_division: float = 1.0) -> float:
    return precision_recall_fbeta(truth, pred, 1.0, average, zero_division)[0]


def recall_score(truth: np.ndarray, pred: np.ndarray, average: str = "micro", zero_division: float = 1.0) -> float:
    return precision_recall_fbeta(truth, pred, 1.0, average, zero_division)[1]


def fbeta_score(truth: np.ndarray, pred: np.ndarray, beta: float = 1.0, average: str = "micro",
                zero_division: float = 1.0) -> float:
    """F-beta; average='samples' with zero_division=1 is `fbeta_per_image`."""
    return precision_recall_fbeta(truth, pred, beta, average, zero_division)[2]


def f1_score(truth: np.ndarray, pred: np.ndarray, average: str = "micro", zero_division: float = 1.0) -> float:
    return precision_recall_fbeta(truth, pred, 1.0, average, zero_division)[2]


def subset_accuracy(truth: np.ndarray, pred: np.ndarray) -> float:
    """Share of images whose label set is exactly right (sklearn accuracy_score on indicators)."""
    truth, pred = _bool2d(truth, pred)
    return float((truth == pred).all(1).mean()) if len(truth) else 0.0


def label_accuracy(truth: np.ndarray, pred: np.ndarray) -> float:
    """Share of correct (image, label) decisions, 1 - sklearn's hamming_loss (Helsinki's 'accuracy')."""
    truth, pred = _bool2d(truth, pred)
    return float((truth == pred).mean()) if truth.size else 0.0


def per_class_report(truth: np.ndarray, pred: np.ndarray, beta: float = 1.0,
                     zero_division: float = 1.0) -> dict[str, np.ndarray]:
    """Per-class arrays for error analysis: support, tp, fp, fn, errors (fp + fn), precision,
    recall, fbeta (sklearn's average=None)."""
    truth, pred = _bool2d(truth, pred)
    tp, fp, fn = (truth & pred).sum(0), (~truth & pred).sum(0), (truth & ~pred).sum(0)
    b2 = beta * beta
    return {"support": truth.sum(0), "tp": tp, "fp": fp, "fn": fn, "errors": fp + fn,
            "precision": _ratio(tp, tp + fp, zero_division), "recall": _ratio(tp, tp + fn, zero_division),
            "fbeta": _ratio((1 + b2) * tp, (1 + b2) * tp + b2 * fn + fp, zero_division)}
''',
'kernelkit.decide.reports': r'''"""Reports written beside the outputs: training curves, label statistics, error analysis.

- `plot_history`: loss and validation-score curves from history.csv (the Scene-15 seed's plots).
  matplotlib is optional (Kaggle images have it, the pinned local set does not): without it the
  plot is skipped with a log line.
- `label_statistics`: labels per class and per image, unlabelled images, image sizes read from
  file headers (the iMet EDA: 1103 labels, odd aspect ratios; Helsinki: half the images unlabelled).
- `error_analysis`: per-label error counts and the images with the most wrong labels (the
  Helsinki seed's error analysis); for single-label tasks the most frequent confusions.

Each analysis returns {"summary": JSON-ready dict, <table name>: DataFrame, ...}; the write_*
functions save the tables as CSV and the summary as JSON in out_dir and return the summary.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..core.fileio import atomic_write, write_json
from .metrics import one_hot, per_class_report

log = logging.getLogger("kernelkit")

SEP = "; "  # between label names in one cell: iMet names contain spaces ("tag::writing implements")
HIST_CAP = 10  # wrong labels per image: 10 and more share one bin, the JSON stays small


# ----------------------------------------------------------------------------- training curves

def plot_history(history_csv: Path, out_png: Path, metric: str = "validation score") -> Path | None:
    """Training loss, validation score and learning rate per epoch from history.csv -> out_png,
    or None when matplotlib is missing or there is nothing to plot."""
    try:
        from matplotlib.figure import Figure  # pyplot is not needed and would pick a GUI backend
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        log.info("matplotlib is not installed; skipping %s", Path(out_png).name)
        return None
    history_csv, out_png = Path(history_csv), Path(out_png)
    if not history_csv.is_file() or history_csv.stat().st_size == 0:
        log.info("no %s yet; skipping %s", history_csv.name, out_png.name)
        return None
    h = pd.read_csv(history_csv)
    if h.empty or "train_loss" not in h:
        log.info("%s has no training rows; skipping %s", history_csv.name, out_png.name)
        return None
    x = h["epoch"] if "epoch" in h else pd.Series(range(len(h)))
    has_val = "val_score" in h and h["val_score"].notna().any()
    has_lr = "lr_end" in h
    panels = 1 + has_val + has_lr
    fig = Figure(figsize=(4.5 * panels, 3.6), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    ax.plot(x, h["train_loss"], marker="o", label="train")
    if "val_loss" in h and h["val_loss"].notna().any():
        ax.plot(x, h["val_loss"], marker="o", label="validation")
    ax.set(title="loss", xlabel="epoch")
    ax.legend()
    if has_val:
        ax = axes[1]
        v = h["val_score"]
        ax.plot(x, v, marker="o", color="tab:green")
        best = int(v.idxmax())
        ax.scatter([x[best]], [v[best]], s=120, facecolors="none", edgecolors="tab:red",
                   label=f"best {v[best]:.4f} (epoch {x[best]})")
        ax.set(title=metric, xlabel="epoch")
        ax.legend()
    if has_lr:
        ax = axes[-1]
        ax.plot(x, h["lr_end"], marker="o", color="tab:gray")
        ax.set(title="learning rate at epoch end", xlabel="epoch")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_png, lambda f: fig.savefig(f, format="png", dpi=100))
    return out_png


# ----------------------------------------------------------------------------- label statistics

def image_sizes(paths: list[str], sample: int, seed: int, extreme_aspect: float) -> dict:
    """Width/height from file headers only (PIL reads the size without decoding the pixels)."""
    paths = [p for p in paths if p]  # "" marks a missing file (competition.py)
    rng = np.random.default_rng(seed)
    if len(paths) > sample:
        paths = [paths[i] for i in rng.choice(len(paths), sample, replace=False)]
    sizes, unreadable = [], 0
    for p in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # no pixels are decoded
                with Image.open(p) as im:
                    sizes.append(im.size)
        except (OSError, ValueError, Image.DecompressionBombError):
            unreadable += 1
    out: dict = {"sampled": len(paths), "unreadable": unreadable}
    if not sizes:
        return out
    wh = np.array(sizes, dtype=np.float64)
    aspect = np.maximum(wh[:, 0] / wh[:, 1], wh[:, 1] / wh[:, 0])
    for name, col in (("width", wh[:, 0]), ("height", wh[:, 1])):
        out[name] = {"min": int(col.min()), "median": float(np.median(col)), "max": int(col.max())}
    out["extreme_aspect"] = extreme_aspect
    out["extreme_aspect_share"] = round(float((aspect > extreme_aspect).mean()), 4)
    out["max_aspect"] = round(float(aspect.max()), 2)
    out["aspect_quantiles"] = {f"p{q}": round(float(np.percentile(aspect, q)), 2) for q in (50, 75, 90)}
    out["short_side_median"] = float(np.median(wh.min(1)))
    out["long_side_median"] = float(np.median(wh.max(1)))
    return out


def label_statistics(targets: np.ndarray, class_names: list[str], image_paths: list[str] | None, task: str,
                     sample_sizes: int = 2000, seed: int = 0, extreme_aspect: float = 2.0, top: int = 10) -> dict:
    """-> {"summary": dict, "per_class": DataFrame(index, name, count, share)}.

    targets: (N, C) 0/1 for task "multilabel", (N,) class indices otherwise. share = count / images.
    The summary holds the labels-per-image histogram, images with no label, the `top` rarest and
    most common classes, and image sizes from the headers of at most `sample_sizes` random paths.
    """
    targets = np.asarray(targets)
    n, c = len(targets), len(class_names)
    multilabel = task == "multilabel"
    if multilabel:
        counts = targets.astype(bool).sum(0)
        per_image = targets.astype(bool).sum(1)
    else:
        counts = np.bincount(targets.astype(np.int64), minlength=c)
        per_image = np.ones(n, np.int64)
    if len(counts) != c:
        raise ValueError(f"targets have {len(counts)} classes, class_names {c}")
    share = counts / max(n, 1)
    per_class = pd.DataFrame({"index": np.arange(c), "name": class_names, "count": counts,
                              "share": share.round(6)})
    order = np.lexsort((np.arange(c), counts))  # rarest first, ties by class index
    nonzero = counts[counts > 0]
    summary: dict = {
        "task": task, "images": n, "classes": c,
        "label_occurrences": int(counts.sum()),
        "classes_without_images": int((counts == 0).sum()),
        # Most / least frequent class with images: how much a loss or sampler may need rebalancing.
        "imbalance_ratio": round(float(nonzero.max() / nonzero.min()), 1) if len(nonzero) else None,
        "rarest": [[class_names[i], int(counts[i])] for i in order[:top]],
        "most_common": [[class_names[i], int(counts[i])] for i in order[::-1][:top]],
    }
    if multilabel:
        hist = np.bincount(per_image) if n else np.zeros(1, np.int64)
        summary.update(
            labels_per_image={"mean": round(float(per_image.mean()), 3) if n else 0.0,
                              "max": int(per_image.max()) if n else 0,
                              "histogram": {str(k): int(v) for k, v in enumerate(hist) if v}},
            images_without_label=int((per_image == 0).sum()),
            images_without_label_share=round(float((per_image == 0).mean()), 4) if n else 0.0)
    if image_paths is not None:
        summary["image_sizes"] = image_sizes(list(image_paths), sample_sizes, seed, extreme_aspect)
    return {"summary": summary, "per_class": per_class}


def write_label_statistics(targets: np.ndarray, class_names: list[str], image_paths: list[str] | None,
                           task: str, out_dir: Path, sample_sizes: int = 2000, seed: int = 0) -> dict:
    """label_stats.csv (per class) and label_stats.json (summary) in out_dir -> the summary."""
    stats = label_statistics(targets, class_names, image_paths, task, sample_sizes, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "label_stats.csv", stats["per_class"].to_csv(index=False))
    s = stats["summary"]
    write_json(out_dir / "label_stats.json", s)
    line = f"labels: {s['images']} images, {s['classes']} classes, imbalance {s['imbalance_ratio']}x"
    if "labels_per_image" in s:
        line += (f", {s['labels_per_image']['mean']:.2f} labels per image (max {s['labels_per_image']['max']}), "
                 f"{s['images_without_label']} images without a label")
    sizes = s.get("image_sizes", {})
    if "width" in sizes:
        line += (f"; sizes w {sizes['width']['min']}-{sizes['width']['max']} h {sizes['height']['min']}-"
                 f"{sizes['height']['max']}, {sizes['extreme_aspect_share']:.1%} with aspect > "
                 f"{sizes['extreme_aspect']:g} ({sizes['sampled']} sampled)")
    log.info("%s", line)
    return s


# ----------------------------------------------------------------------------- error analysis

def _top_probs(probs: np.ndarray, class_names: list[str], k: int) -> list[str]:
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [SEP.join(f"{class_names[j]} {p[j]:.3f}" for j in row) for p, row in zip(probs, order)]


def _names(mask_rows: np.ndarray, class_names: list[str]) -> list[str]:
    return [SEP.join(class_names[j] for j in np.flatnonzero(r)) for r in mask_rows]


def _per_label(truth: np.ndarray, pred: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    r = per_class_report(truth, pred, beta=1.0)
    df = pd.DataFrame({"index": np.arange(len(class_names)), "name": class_names, "support": r["support"],
                       "predicted": r["tp"] + r["fp"], "tp": r["tp"], "fp": r["fp"], "fn": r["fn"],
                       "errors": r["errors"], "precision": r["precision"].round(4),
                       "recall": r["recall"].round(4), "f1": r["fbeta"].round(4)})
    return df.sort_values(["errors", "index"], ascending=[False, True], kind="stable").reset_index(drop=True)


def _multilabel_errors(truth: np.ndarray, pred: np.ndarray, probs: np.ndarray | None, class_names: list[str],
                       ids: list[str], top: int) -> dict:
    truth, pred = truth.astype(bool), pred.astype(bool)
    fn, fp = truth & ~pred, ~truth & pred
    wrong = fn.sum(1) + fp.sum(1)
    # Among equally wrong images, the more confidently wrong first.
    # Summed over the wrong cells only (no (N, C) float temporaries).
    err_rows, err_cols = np.nonzero(fn | fp)
    confidence = np.zeros(len(truth)) if probs is None else np.bincount(
        err_rows, weights=np.abs(probs[err_rows, err_cols] - truth[err_rows, err_cols]), minlength=len(truth))
    worst = np.lexsort((np.arange(len(truth)), -confidence, -wrong))[:top]
    worst = worst[wrong[worst] > 0]
    table = pd.DataFrame({"id": [ids[i] for i in worst], "n_wrong": wrong[worst],
                          "n_true": truth[worst].sum(1), "n_pred": pred[worst].sum(1),
                          "missing": _names(fn[worst], class_names), "extra": _names(fp[worst], class_names)})
    if probs is not None:
        table["top_probs"] = _top_probs(probs[worst], class_names, 5)
    # Confident false positives: often a label the annotators left out (Helsinki: a river in view
    # but no 'river' label, unlabelled images given reasonable labels).
    rows, cols = np.nonzero(fp)
    if probs is not None:
        p = probs[rows, cols]
        pick = np.lexsort((cols, rows, -p))[:top]
    else:
        p, pick = np.full(len(rows), np.nan), np.arange(min(top, len(rows)))
    candidates = pd.DataFrame({"id": [ids[i] for i in rows[pick]], "label": [class_names[j] for j in cols[pick]],
                               "prob": np.round(p[pick], 4), "n_true": truth[rows[pick]].sum(1)})
    unlabelled = ~truth.any(1)
    hist = np.bincount(np.minimum(wrong, HIST_CAP), minlength=HIST_CAP + 1)
    summary = {
        "task": "multilabel", "images": len(truth),
        "wrong_labels": int(wrong.sum()), "false_positives": int(fp.sum()), "false_negatives": int(fn.sum()),
        "images_with_errors": int((wrong > 0).sum()),
        # Helsinki: most images had one wrong label at most, four or more were rare.
        "wrong_labels_per_image": {(str(k) if k < HIST_CAP else f"{k}+"): int(v) for k, v in enumerate(hist) if v},
        "images_without_label": int(unlabelled.sum()),
        "unlabelled_images_given_labels": int((unlabelled & pred.any(1)).sum()),
    }
    return {"summary": summary, "worst_images": table, "missing_label_candidates": candidates}


def _multiclass_errors(truth: np.ndarray, pred: np.ndarray, probs: np.ndarray | None, class_names: list[str],
                       ids: list[str], top: int) -> dict:
    c = len(class_names)
    truth, pred = truth.astype(np.int64), pred.astype(np.int64)
    wrong = truth != pred
    support = np.bincount(truth, minlength=c)
    pairs, counts = np.unique(truth[wrong] * c + pred[wrong], return_counts=True)
    order = np.lexsort((pairs, -counts))[:top]
    t, p = pairs[order] // c, pairs[order] % c
    confusions = pd.DataFrame({"true": [class_names[i] for i in t], "pred": [class_names[i] for i in p],
                               "count": counts[order], "share_of_true": np.round(counts[order] / support[t], 4)})
    if probs is not None:
        p_true = probs[np.arange(len(truth)), truth]
        worst = np.lexsort((np.arange(len(truth)), p_true))[:top]  # least probability on the truth first
    else:
        worst = np.flatnonzero(wrong)[:top]
    table = pd.DataFrame({"id": [ids[i] for i in worst], "true": [class_names[i] for i in truth[worst]],
                          "pred": [class_names[i] for i in pred[worst]], "correct": ~wrong[worst]})
    if probs is not None:
        table["p_true"] = np.round(p_true[worst], 4)
        table["p_pred"] = np.round(probs[worst, pred[worst]], 4)
        table["top_probs"] = _top_probs(probs[worst], class_names, 3)
    summary = {"task": "multiclass", "images": len(truth), "errors": int(wrong.sum()),
               "accuracy": round(float(1 - wrong.mean()), 4) if len(truth) else 0.0,
               "top_confusions": [[a, b, int(n)] for a, b, n in
                                  zip(confusions["true"][:5], confusions["pred"][:5], confusions["count"][:5])]}
    return {"summary": summary, "worst_images": table, "confusion_pairs": confusions}


def error_analysis(truth: np.ndarray, pred: np.ndarray, probs: np.ndarray | None, class_names: list[str],
                   ids: list[str], top: int = 20) -> dict:
    """Where a model goes wrong on validation images.

    Multi-label: truth and pred (N, C) bool -> tables per_label (fp, fn, precision, recall, F1,
    most errors first), worst_images (most wrong labels: the missing and extra label names, top
    probabilities) and missing_label_candidates (the most confident false positives).
    Single-label: truth and pred (N,) class indices -> per_label, confusion_pairs (most frequent
    true -> predicted mistakes) and worst_images (least probability on the true class).
    probs (N, C) may be None: the probability columns are left out. Returns {"summary": dict, tables...}.
    """
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape or len(ids) != len(truth):
        raise ValueError(f"truth {truth.shape}, pred {pred.shape} and {len(ids)} ids must match")
    if probs is not None:
        probs = np.asarray(probs, dtype=np.float32)  # no float64 copy: (N, C) is large at 15,000 classes
        if probs.shape != (len(truth), len(class_names)):
            raise ValueError(f"probs {probs.shape} must be ({len(truth)}, {len(class_names)})")
    if truth.ndim == 2:
        if truth.shape[1] != len(class_names):
            raise ValueError(f"{truth.shape[1]} label columns, {len(class_names)} class names")
        out = _multilabel_errors(truth, pred, probs, class_names, ids, top)
        out["per_label"] = _per_label(truth, pred, class_names)
    else:
        out = _multiclass_errors(truth, pred, probs, class_names, ids, top)
        c = len(class_names)
        out["per_label"] = _per_label(one_hot(truth.astype(np.int64), c), one_hot(pred.astype(np.int64), c),
                                      class_names)
    per_label = out["per_label"]
    worst = per_label[per_label["errors"] > 0][:5]
    out["summary"]["most_errors"] = [[n, int(e)] for n, e in zip(worst["name"], worst["errors"])]
    return out


def write_error_analysis(truth: np.ndarray, pred: np.ndarray, probs: np.ndarray | None, class_names: list[str],
                         ids: list[str], out_dir: Path, top: int = 20) -> dict:
    """errors_per_label.csv, worst_images.csv, confusion_pairs.csv (single-label) or
    missing_label_candidates.csv (multi-label), error_summary.json in out_dir -> the summary."""
    result = error_analysis(truth, pred, probs, class_names, ids, top)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "errors_per_label.csv", result["per_label"].to_csv(index=False))
    for name in ("worst_images", "confusion_pairs", "missing_label_candidates"):
        if name in result:
            atomic_write(out_dir / f"{name}.csv", result[name].to_csv(index=False))
    s = result["summary"]
    write_json(out_dir / "error_summary.json", s)
    most = ", ".join(f"{n} ({e})" for n, e in s["most_errors"][:3])
    if s["task"] == "multilabel":
        log.info("error analysis: %d of %d validation images have a wrong label (%d missing, %d extra); "
                 "most errors: %s", s["images_with_errors"], s["images"], s["false_negatives"],
                 s["false_positives"], most)
    else:
        top_pair = s["top_confusions"][0] if s["top_confusions"] else None
        log.info("error analysis: %d of %d validation images wrong; most errors: %s%s", s["errors"], s["images"],
                 most, f"; most frequent confusion {top_pair[0]} -> {top_pair[1]} ({top_pair[2]})" if top_pair else "")
    return s
''',
'kernelkit.decide.rules': r'''"""Every decision about how probabilities become labels, in one place.

During training: the validation score and the global threshold of each epoch
(`score_validation`). After training: the rule for the submission, refined per group or class on
the best epoch's validation probabilities when asked (`refine_rule`). At inference: the rule a
checkpoint carries (`rule_from_checkpoint`) and the rule for an average of several
(`ensemble_rule`). A user's explicit `threshold` always wins.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .labels import decode_multilabel
from .metrics import accuracy, fbeta_per_image
from .thresholds import ThresholdRule, gaps_to_best, groups_from_names, search_classes, search_global, search_groups

log = logging.getLogger("kernelkit")


@dataclass(frozen=True)
class RuleSettings:
    """The user's settings for multi-label decoding (Config's threshold, threshold_rule, ...)."""
    threshold: float = -1.0  # <0: searched on validation
    kind: str = "global"
    min_labels: int = 0
    max_labels: int = 0
    beta: float = 2.0

    @classmethod
    def of(cls, cfg: Any) -> "RuleSettings":
        return cls(cfg.threshold, cfg.threshold_rule, cfg.min_labels, cfg.max_labels, cfg.beta)

    def global_rule(self, threshold: float) -> ThresholdRule:
        t = self.threshold if self.threshold >= 0 else threshold
        return ThresholdRule("global", [t], self.min_labels, self.max_labels)


def score_validation(task: str, targets: np.ndarray, probs: np.ndarray, threshold: float = -1.0,
                     beta: float = 2.0, min_labels: int = 0, max_labels: int = 0, settle: bool = True) -> dict:
    """Competition metric on validation; multi-label also picks the global threshold (settled, or the
    exact best with `settle=False`)."""
    if task == "multilabel":
        if threshold >= 0:
            s = fbeta_per_image(targets, decode_multilabel(probs, threshold, min_labels, max_labels), beta)
            t = threshold
        elif settle:
            t, s = settled_threshold(targets, probs, beta, min_labels, max_labels)
        else:
            rule, s = search_global(targets, probs, beta, min_labels=min_labels, max_labels=max_labels)
            t = rule.values[0]
        return {"score": s, "threshold": t, "metric": f"F{beta:g} per image"}
    acc = accuracy(targets, probs)
    return {"score": acc, "threshold": 0.5, "metric": "accuracy", "top1_error": 1 - acc}


# A later epoch takes best.pt unless it validates worse than the best score so far by more than this many
# standard errors of that score. The highest of a run's noisy validation scores is biased upwards (it is
# the maximum), and under a schedule that decays to zero the last epochs are the better weights: keeping
# a mid-run epoch that won by one image of 126 lost 0.005 test F2 / accuracy to a notebook that simply
# predicts with its last epoch (bench_finetune.py, digits, README fine-tuning). Two standard errors let
# a one-image difference pass at any score on a hundred images, and hold off a real drop.
NOISE_Z = 2.0
THRESHOLD_Z = 2.0  # settled_threshold: thresholds within two standard errors of the best count as ties


def score_noise(score: float, n_images: int) -> float:
    """Upper bound on the standard error of a score that is a mean of per-image values in [0, 1]
    (accuracy, F-beta per image) over `n_images`: a Bernoulli variable has the largest variance of any
    [0, 1] variable with that mean. The mean is smoothed as (k + 1) / (n + 2) (Laplace), so a perfect
    score on a hundred images still carries the noise of one image rather than none."""
    if n_images <= 0 or not math.isfinite(score):
        return 0.0
    p = (min(max(score, 0.0), 1.0) * n_images + 1.0) / (n_images + 2.0)
    return math.sqrt(p * (1.0 - p) / n_images)


def keeps_up(score: float, peak: float, n_images: int, z: float = NOISE_Z) -> bool:
    """Whether a later epoch scoring `score` replaces the best checkpoint, the run's peak being `peak`."""
    return math.isfinite(score) and (not math.isfinite(peak) or score >= peak - z * score_noise(peak, n_images))


def settled_threshold(targets: np.ndarray, probs: np.ndarray, beta: float = 2.0, min_labels: int = 0,
                      max_labels: int = 0) -> tuple[float, float]:
    """The global threshold for the submission -> (threshold, its validation score): of the thresholds
    that fall behind the best by no more than THRESHOLD_Z standard errors of the image-by-image gap
    (`thresholds.gaps_to_best`), the one nearest F*/(1 + beta^2), F* being the best score. `settle=False` in
    `score_validation` takes the exact best instead (a blend's weight search calls it hundreds of times;
    the blend's own threshold is settled).

    Why not the best alone: on a hundred validation images the F-beta curve is flat near its top and one
    image moves its peak anywhere on the plateau (0.23, 0.55 and 0.39 in three seeds of one digits run,
    whose test optimum was 0.24-0.34; the 0.55 cost 0.009 test F2). F*/(1 + beta^2) is where the
    expected F-beta of calibrated probabilities peaks (Lipton et al. 2014: F1's optimal threshold is half
    the optimal F1; proved for F over the whole set, a heuristic for F averaged per image), 0.2 for F2
    near 1, so it breaks the plateau's tie from theory, not from one image. The gap is paired, so a
    threshold that decodes many images differently is no tie, whatever the two scores: probabilities far
    from calibrated (a focal loss) keep the threshold their data put them at. A tie may lose up to ~3
    images against the best, so an epoch's score (history.csv) is up to that much below the exact best."""
    grid, scores, gap, se = gaps_to_best(targets, probs, beta, min_labels, max_labels)
    near = np.flatnonzero(gap <= THRESHOLD_Z * se + 1e-12)  # the best itself: gap 0
    j = int(near[np.argmin(np.abs(grid[near] - scores.max() / (1 + beta * beta)))])
    return float(grid[j]), float(scores[j])


def refine_rule(settings: RuleSettings, threshold: float, class_names: list[str],
                val_targets: np.ndarray | None, val_probs: np.ndarray | None) -> ThresholdRule:
    """The submission's multi-label rule: the training run's global threshold, refined per group or
    per class on the best epoch's validation probabilities when `settings.kind` asks for it."""
    rule = settings.global_rule(threshold)
    if settings.threshold >= 0 or settings.kind == "global" or val_probs is None or val_targets is None:
        return rule
    if val_probs.shape != val_targets.shape:
        log.warning("validation probabilities do not match the validation split; keeping the global threshold")
        return rule
    limits = dict(min_labels=settings.min_labels, max_labels=settings.max_labels)
    # the ascent starts from the settled global threshold, not from the exact best's one-image peak
    if settings.kind == "group":
        found, score = search_groups(val_targets, val_probs, groups_from_names(class_names), settings.beta,
                                     start=rule.values[0], **limits)
    else:
        found, score = search_classes(val_targets, val_probs, settings.beta, start=rule, show_progress=True, **limits)
    log.info("threshold rule %s: validation F%g %.4f (global %.4f)", found.kind, settings.beta, score,
             rule.score(val_targets, val_probs, settings.beta))
    return found


def rule_from_checkpoint(ckpt: dict[str, Any], settings: RuleSettings | None = None) -> ThresholdRule:
    """The rule a checkpoint was trained to use: its stored rule, else its global threshold with the
    label limits of the run that trained it. `settings` with threshold >= 0 overrides it."""
    if settings is not None and settings.threshold >= 0:
        return settings.global_rule(settings.threshold)
    if ckpt.get("threshold_rule"):
        return ThresholdRule.from_dict(ckpt["threshold_rule"])
    trained = ckpt.get("config", {})
    return ThresholdRule("global", [float(ckpt.get("threshold", 0.5))], int(trained.get("min_labels", 0)),
                         int(trained.get("max_labels", 0)))


def ensemble_rule(rules: list[ThresholdRule], settings: RuleSettings | None = None) -> ThresholdRule:
    """Global thresholds of several checkpoints average; a refined rule is taken from the first."""
    if settings is not None and settings.threshold >= 0:
        return settings.global_rule(settings.threshold)
    if len(rules) == 1:
        return rules[0]
    if all(r.kind == "global" for r in rules):
        return ThresholdRule("global", [float(np.mean([r.values[0] for r in rules]))], rules[0].min_labels,
                             rules[0].max_labels)
    log.info("using the %s threshold rule of the first checkpoint for the average", rules[0].kind)
    return rules[0]
''',
'kernelkit.decide.thresholds': r'''"""Multi-label decision rules and their search on validation probabilities.

A `ThresholdRule` turns (N, C) probabilities into (N, C) booleans: a threshold that is global,
one per group of classes (iMet's 'culture::' vs 'tag::' labels) or one per class, then at least
`min_labels` and (when > 0) at most `max_labels` labels per image. `to_dict()` holds plain Python
types only, so the rule can sit inside a checkpoint read with torch.load(weights_only=True).

The searches maximise F-beta averaged per image (iMet's metric; `beta`). F-beta per image does not
split into a sum over classes, so group and class thresholds are found by coordinate ascent: one
group's (or class's) threshold is swept over the grid while the others stay fixed. Each sweep is
vectorised: a histogram over the grid counts, per image, the labels (and true labels) that a
threshold keeps, so a sweep costs O(N C + N G) rather than G decodings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Iterable, Iterator, Sequence

import numpy as np

from ..core.progress import progress
from .labels import apply_thresholds, limit_labels, order_and_ranks
from .metrics import fbeta_per_image

KINDS = ("global", "group", "class")
CHUNK_CELLS = 2 ** 22  # probabilities scored at a time: int64 grid indices of ~32 MB


def default_grid() -> np.ndarray:
    """0.02, 0.03, ..., 0.95: the grid `metrics.search_threshold` always used."""
    return np.round(np.arange(0.02, 0.96, 0.01), 2)


@dataclass
class ThresholdRule:
    """How to decode multi-label probabilities.

    kind 'global': values = [t]. kind 'group': values[i] is the threshold of group_names[i], and
    groups[c] names the group of class c. kind 'class': values[c] for class c.
    max_labels = 0 means no cap.
    """
    kind: str = "global"
    values: list[float] = field(default_factory=lambda: [0.5])
    min_labels: int = 0
    max_labels: int = 0
    groups: list[str] | None = None
    group_names: list[str] | None = None

    def __post_init__(self) -> None:
        # Plain types, whatever came in (numpy floats would not load under weights_only=True).
        self.values = [float(v) for v in self.values]
        self.min_labels, self.max_labels = int(self.min_labels), int(self.max_labels)
        if self.groups is not None:
            self.groups = [str(g) for g in self.groups]
        if self.group_names is not None:
            self.group_names = [str(g) for g in self.group_names]
        if self.kind not in KINDS:
            raise ValueError(f"unknown threshold kind {self.kind!r}; choose from {KINDS}")
        if self.min_labels < 0 or self.max_labels < 0:
            raise ValueError("min_labels and max_labels must be >= 0")
        if self.max_labels and self.min_labels > self.max_labels:
            raise ValueError(f"min_labels ({self.min_labels}) > max_labels ({self.max_labels})")
        if self.kind == "global" and len(self.values) != 1:
            raise ValueError(f"a global rule has one value, got {len(self.values)}")
        if self.kind == "group":
            if self.groups is None or self.group_names is None or len(self.group_names) != len(self.values):
                raise ValueError("a group rule needs groups (one per class) and group_names (one per value)")
            missing = set(self.groups) - set(self.group_names)
            if missing:
                raise ValueError(f"groups without a threshold: {sorted(missing)}")

    def thresholds(self, num_classes: int) -> np.ndarray:
        """(C,) threshold of each class."""
        if self.kind == "global":
            return np.full(num_classes, self.values[0])
        if self.kind == "group":
            if len(self.groups) != num_classes:
                raise ValueError(f"rule has groups for {len(self.groups)} classes, probabilities have {num_classes}")
            by_name = dict(zip(self.group_names, self.values))
            return np.array([by_name[g] for g in self.groups])
        if len(self.values) != num_classes:
            raise ValueError(f"rule has {len(self.values)} class thresholds, probabilities have {num_classes}")
        return np.array(self.values)

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """(N, C) probabilities -> (N, C) bool predictions."""
        return apply_thresholds(probs, self.thresholds(probs.shape[1]), self.min_labels, self.max_labels)

    def score(self, truth: np.ndarray, probs: np.ndarray, beta: float = 2.0) -> float:
        """F-beta per image of this rule's predictions."""
        return fbeta_per_image(truth, self.apply(probs), beta)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "values": list(self.values), "min_labels": self.min_labels,
                "max_labels": self.max_labels, "groups": None if self.groups is None else list(self.groups),
                "group_names": None if self.group_names is None else list(self.group_names)}

    @classmethod
    def from_dict(cls, d: dict) -> "ThresholdRule":
        unknown = set(d) - {"kind", "values", "min_labels", "max_labels", "groups", "group_names"}
        if unknown:
            raise ValueError(f"unknown threshold rule fields {sorted(unknown)}")
        return cls(**d)


def groups_from_names(names: Iterable[str], sep: str = "::", default: str = "other") -> list[str]:
    """Group of each class from its name's prefix: 'culture::japan' -> 'culture', 'tag::men' -> 'tag';
    names without `sep` go to `default`."""
    return [n.split(sep, 1)[0] if sep in n else default for n in names]


# ------------------------------------------------------------------------------- vectorised scoring


def _fbeta(tp: np.ndarray, n_pred: np.ndarray, n_true: np.ndarray, b2: float) -> np.ndarray:
    """Per-image F-beta from counts; an image with no true and no predicted label scores 1."""
    denom = b2 * n_true + n_pred
    return np.where(denom > 0, (1 + b2) * tp / np.maximum(denom, 1e-12), 1.0)


def _above(idx: np.ndarray, n_grid: int, weights: np.ndarray | None = None) -> np.ndarray:
    """(N, G): per image and grid point j, the (weighted) number of entries with idx > j.

    idx[n, c] = how many grid values lie below probs[n, c], so class c is predicted at grid[j]
    exactly when j < idx[n, c]. A per-image histogram of idx, summed from the right, counts them.
    """
    n = idx.shape[0]
    flat = (np.arange(n)[:, None] * (n_grid + 1) + idx).ravel()
    w = None if weights is None else weights.ravel().astype(np.float64)
    hist = np.bincount(flat, weights=w, minlength=n * (n_grid + 1)).reshape(n, n_grid + 1)
    return np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]


def _force_top(probs: np.ndarray, min_labels: int) -> np.ndarray:
    """Probs with each image's top `min_labels` set to +inf: above every threshold, so thresholding
    these is exactly thresholding plus min_labels, and the sweeps handle min_labels for free."""
    if min_labels <= 0:
        return probs
    _, ranks = order_and_ranks(probs)
    return np.where(ranks < min_labels, np.inf, probs)


def _prepare(truth: np.ndarray, probs: np.ndarray, grid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    truth, probs = np.asarray(truth).astype(bool), np.asarray(probs, dtype=np.float64)
    nan = np.isnan(probs)
    if nan.any():  # NaN is below every threshold, as `labels.apply_thresholds` decodes it (NaN > t is
        # False): the searched score is then the score of what the submission will say
        probs = np.where(nan, -np.inf, probs)
    if truth.shape != probs.shape or truth.ndim != 2:
        raise ValueError(f"truth {truth.shape} and probs {probs.shape} must be the same (N, C) shape")
    grid = np.unique(np.asarray(default_grid() if grid is None else grid, dtype=np.float64))  # sorted
    if not len(grid):
        raise ValueError("empty threshold grid")
    return truth, probs, grid


def _pick(scores: np.ndarray, grid: np.ndarray, current_score: float, current_t: float, tol: float) -> float | None:
    """Grid value to move to, or None to stay: only a strict gain counts, and among (near) ties the
    value nearest the current one wins, so plateaus do not make thresholds wander."""
    best = scores.max()
    if best <= current_score + tol:
        return None
    near_best = np.flatnonzero(scores >= best - tol)
    return float(grid[near_best[np.argmin(np.abs(grid[near_best] - current_t))]])


def _image_scores(truth: np.ndarray, probs: np.ndarray, grid: np.ndarray, beta: float, min_labels: int,
                  max_labels: int, show_progress: bool, chunk: int) -> Iterator[np.ndarray]:
    """(rows, G) F-beta of each image at each threshold of the sorted `grid`, `chunk` images at a time
    (chunk x C grid indices, chunk x G scores); 0 = as many rows as make CHUNK_CELLS cells, so 15,000
    classes get smaller chunks."""
    b2 = beta * beta
    chunk = chunk or max(1, min(4096, CHUNK_CELLS // max(probs.shape[1], 1)))
    starts = range(0, len(probs), chunk)
    if show_progress:
        starts = progress(starts, desc="threshold", total=len(starts))
    for s in starts:
        y, p = truth[s:s + chunk], probs[s:s + chunk]
        n_true = y.sum(1)[:, None]
        if max_labels > 0:
            # A global threshold keeps each image's top k; min/max labels make it the top clip(k).
            k = _above(np.searchsorted(grid, p, side="left"), len(grid))
            k = np.clip(k, min_labels, max_labels).astype(np.int64)
            order, _ = order_and_ranks(p)
            cum_tp = np.concatenate([np.zeros((len(p), 1)), np.cumsum(np.take_along_axis(y, order, 1), 1)], 1)
            tp = np.take_along_axis(cum_tp, k, axis=1)
        else:
            idx = np.searchsorted(grid, _force_top(p, min_labels), side="left")
            k, tp = _above(idx, len(grid)), _above(idx, len(grid), y)
        yield _fbeta(tp, k, n_true, b2)


def global_scores(truth: np.ndarray, probs: np.ndarray, grid: np.ndarray, beta: float = 2.0, min_labels: int = 0,
                  max_labels: int = 0, show_progress: bool = False, chunk: int = 0) -> np.ndarray:
    """(G,) F-beta per image for each threshold of the sorted `grid`, min/max labels included exactly."""
    total = np.zeros(len(grid))
    for f in _image_scores(truth, probs, grid, beta, min_labels, max_labels, show_progress, chunk):
        total += f.sum(0)
    return total / max(len(probs), 1)


# ------------------------------------------------------------------------------- searches


def threshold_curve(truth: np.ndarray, probs: np.ndarray, beta: float = 2.0, grid: np.ndarray | None = None,
                    min_labels: int = 0, max_labels: int = 0,
                    show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """-> (sorted grid, F-beta per image at each of its thresholds), min/max labels included."""
    truth, probs, grid = _prepare(truth, probs, grid)
    return grid, global_scores(truth, probs, grid, beta, min_labels, max_labels, show_progress)


def gaps_to_best(truth: np.ndarray, probs: np.ndarray, beta: float = 2.0, min_labels: int = 0, max_labels: int = 0,
                 chunk: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`threshold_curve`, and how far each of its thresholds falls behind the best one, image by image
    -> (sorted grid, (G,) scores, (G,) mean gap, (G,) its standard error); the inputs prepared once.
    Paired: two thresholds that decode all but one image alike differ by that image only, which the
    spread of the two scores over all images would drown."""
    truth, probs, grid = _prepare(truth, probs, None)
    scores = global_scores(truth, probs, grid, beta, min_labels, max_labels, chunk=chunk)
    best = int(np.argmax(scores))
    total, squares = np.zeros(len(grid)), np.zeros(len(grid))
    for f in _image_scores(truth, probs, grid, beta, min_labels, max_labels, False, chunk):
        d = f[:, best:best + 1] - f
        total += d.sum(0)
        squares += (d * d).sum(0)
    n = max(len(probs), 1)
    mean = total / n
    return grid, scores, mean, np.sqrt(np.maximum(squares / n - mean * mean, 0.0) / n)


def search_global(truth: np.ndarray, probs: np.ndarray, beta: float = 2.0, grid: np.ndarray | None = None,
                  min_labels: int = 0, max_labels: int = 0,
                  show_progress: bool = False) -> tuple[ThresholdRule, float]:
    """Best single threshold on the grid -> (rule, F-beta per image). Ties go to the lowest threshold."""
    grid, scores = threshold_curve(truth, probs, beta, grid, min_labels, max_labels, show_progress)
    j = int(np.argmax(scores))
    return ThresholdRule("global", [float(grid[j])], min_labels, max_labels), float(scores[j])


def _state(truth: np.ndarray, forced: np.ndarray, thr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred = forced > thr
    return pred, pred.sum(1), (pred & truth).sum(1)


def _finish(rule: ThresholdRule, fallback: ThresholdRule, truth: np.ndarray, probs: np.ndarray,
            beta: float) -> tuple[ThresholdRule, float]:
    """Exact score of the found rule. The sweeps ignore max_labels, so with a cap keep whichever of
    the found rule and its start scores higher; without one the ascent never loses to its start."""
    s_rule = rule.score(truth, probs, beta)
    if rule.max_labels <= 0:
        return rule, s_rule
    s_fallback = fallback.score(truth, probs, beta)
    return (rule, s_rule) if s_rule >= s_fallback else (fallback, s_fallback)


def search_groups(truth: np.ndarray, probs: np.ndarray, groups: Sequence[Hashable], beta: float = 2.0,
                  grid: np.ndarray | None = None, min_labels: int = 0, max_labels: int = 0,
                  start: float | None = None, rounds: int = 3) -> tuple[ThresholdRule, float]:
    """One threshold per group of classes (groups[c] = group of class c) -> (rule, F-beta per image).

    Coordinate ascent from the best global threshold (or `start`): each round sweeps every group's
    threshold over the grid with the other groups fixed, until a round changes nothing. Starting
    from the global optimum, the result scores at least as well as the global rule.
    """
    truth, probs, grid = _prepare(truth, probs, grid)
    if len(groups) != probs.shape[1]:
        raise ValueError(f"{len(groups)} groups for {probs.shape[1]} classes")
    names = list(dict.fromkeys(str(g) for g in groups))
    gidx = np.array([names.index(str(g)) for g in groups])
    if start is None:
        start = search_global(truth, probs, beta, grid, min_labels, max_labels)[0].values[0]
    values = [float(start)] * len(names)
    b2, n_true = beta * beta, truth.sum(1)
    forced = _force_top(probs, min_labels)
    pred, k, tp = _state(truth, forced, np.array(values)[gidx])
    current = float(_fbeta(tp, k, n_true, b2).mean())
    for _ in range(rounds):
        moved = False
        for g in range(len(names)):
            cols = gidx == g
            k_o, tp_o = k - pred[:, cols].sum(1), tp - (pred[:, cols] & truth[:, cols]).sum(1)
            idx = np.searchsorted(grid, forced[:, cols], side="left")
            kg, tpg = _above(idx, len(grid)), _above(idx, len(grid), truth[:, cols])
            scores = _fbeta(tp_o[:, None] + tpg, k_o[:, None] + kg, n_true[:, None], b2).mean(0)
            t = _pick(scores, grid, current, values[g], 1e-12)
            if t is None:
                continue
            values[g], current, moved = t, float(scores[np.searchsorted(grid, t)]), True
            pred, k, tp = _state(truth, forced, np.array(values)[gidx])
        if not moved:
            break
    group_list = [str(g) for g in groups]
    rule = ThresholdRule("group", values, min_labels, max_labels, groups=group_list, group_names=names)
    fallback = ThresholdRule("group", [float(start)] * len(names), min_labels, max_labels, groups=group_list,
                             group_names=names)
    return _finish(rule, fallback, truth, probs, beta)


def search_classes(truth: np.ndarray, probs: np.ndarray, beta: float = 2.0, grid: np.ndarray | None = None,
                   min_labels: int = 0, max_labels: int = 0, start: ThresholdRule | None = None,
                   rounds: int = 2, min_positives: int = 3,
                   show_progress: bool = False) -> tuple[ThresholdRule, float]:
    """One threshold per class -> (rule, F-beta per image).

    Coordinate ascent from `start` (default: the best global rule): each class's threshold is
    swept with all others fixed; only the images' scores with that class on vs off are needed,
    so a sweep is O(N + G). Classes with fewer than `min_positives` positives in `truth` keep
    their start threshold: a threshold fitted to one or two examples is noise on the test set.
    """
    truth, probs, grid = _prepare(truth, probs, grid)
    n, c = probs.shape
    if start is None:
        start = search_global(truth, probs, beta, grid, min_labels, max_labels)[0]
    thr = start.thresholds(c).astype(np.float64)
    b2, n_true = beta * beta, truth.sum(1)
    forced = _force_top(probs, min_labels)
    pred, k, tp = _state(truth, forced, thr)
    tunable = np.flatnonzero(truth.sum(0) >= max(min_positives, 0))
    tol = 1e-12 * max(n, 1)
    for r in range(rounds):
        moved = False
        cols = tunable
        if show_progress:
                cols = progress(tunable, desc=f"class thresholds {r + 1}/{rounds}", total=len(tunable))
        for j in cols:
            on, yc = pred[:, j], truth[:, j]
            k_o, tp_o = k - on, tp - (on & yc)
            f_on, f_off = _fbeta(tp_o + yc, k_o + 1, n_true, b2), _fbeta(tp_o, k_o, n_true, b2)
            idx = np.searchsorted(grid, forced[:, j], side="left")
            gain = np.bincount(idx, weights=f_on - f_off, minlength=len(grid) + 1)
            scores = f_off.sum() + np.cumsum(gain[::-1])[::-1][1:]  # totals, not means: cheaper
            current = f_off.sum() + (f_on - f_off)[on].sum()
            t = _pick(scores, grid, current, thr[j], tol)
            if t is None:
                continue
            thr[j], moved = t, True
            new_on = forced[:, j] > t
            k, tp = k_o + new_on, tp_o + (new_on & yc)
            pred[:, j] = new_on
        if not moved:
            break
    rule = ThresholdRule("class", thr.tolist(), min_labels, max_labels)
    fallback = ThresholdRule("class", start.thresholds(c).tolist(), min_labels, max_labels)
    return _finish(rule, fallback, truth, probs, beta)


def search_label_limits(truth: np.ndarray, probs: np.ndarray, rule: ThresholdRule, beta: float = 2.0,
                        min_choices: Sequence[int] = (0, 1, 2, 3),
                        max_choices: Sequence[int] = (0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20)) -> tuple[ThresholdRule, float]:
    """Best (min_labels, max_labels) for `rule`'s thresholds -> (rule with them, F-beta per image).

    Every pair with min <= max (max 0: no cap) is scored exactly; the probabilities are sorted
    once. Ties keep the smaller min and the larger cap (the less forcing rule).
    """
    truth, probs, _ = _prepare(truth, probs, None)
    base = probs > rule.thresholds(probs.shape[1])
    order, ranks = order_and_ranks(probs)
    best: tuple[float, int, int] | None = None
    # Loosest first, so that on ties the first (least forcing) pair stays: no cap (0), then
    # falling caps; within a cap, rising min.
    for mx in sorted(set(max_choices), key=lambda m: -m if m > 0 else -np.inf):
        for mn in sorted(set(min_choices)):
            if mx > 0 and mn > mx:
                continue
            s = fbeta_per_image(truth, limit_labels(base, order, ranks, mn, mx), beta)
            if best is None or s > best[0] + 1e-12:
                best = (s, mn, mx)
    s, mn, mx = best
    d = rule.to_dict()
    d.update(min_labels=mn, max_labels=mx)
    return ThresholdRule.from_dict(d), s


def search_threshold(truth: np.ndarray, probs: np.ndarray, beta: float = 2.0, min_labels: int = 0,
                     grid: np.ndarray | None = None) -> tuple[float, float]:
    """Best single global threshold on validation probabilities -> (threshold, score).

    Ties go to the lowest threshold.
    """
    rule, score = search_global(truth, probs, beta, grid, min_labels)
    return rule.values[0], score


def prior_baseline(task: str, train_targets: np.ndarray, val_targets: np.ndarray, beta: float = 2.0) -> float:
    """Score of the best constant prediction from training label frequencies: the bar to beat."""
    if task == "multiclass":
        majority = np.bincount(train_targets).argmax() if len(train_targets) else 0
        return float((val_targets == majority).mean()) if len(val_targets) else 0.0
    freq = train_targets.mean(0)
    probs = np.broadcast_to(freq, val_targets.shape)
    return search_threshold(val_targets, probs, beta, grid=np.unique(np.concatenate([[0.0], freq])))[1]
''',
'kernelkit.engine': r'''"""Training and prediction under the wall clock: the budget clock and inference reserve (`budget`),
the plan (`plan`), progressive resizing (`resolution`), the training loop and the checkpoint
format it saves and restores (`trainer`, `TrainState`), the prediction and validation loop
(`evaluate`), weight averaging (`swa`), the not-learning check (`learning_check`), checkpoint files:
names, atomic background writes, format versions (`checkpoint`), resuming (`resume`) and the
run_state.json of a run spread over sessions (`run_state`). Takes explicit objects, never the
config's wiring; imports from `core`, `inputs`, `data`, `model` and `decide`."""
''',
'kernelkit.engine.budget': r'''"""Wall-clock budget and the learning-rate schedule defined over it.

Budgeted training (Li et al., ICLR 2020): for a fixed time budget, a schedule that decays to zero
exactly when the budget ends beats any schedule tuned for a number of epochs that may not fit.
So progress is measured in time (or in steps when epochs are fixed) and the LR is a function of it.
"""
from __future__ import annotations

import math

from ..core.checks import budget_and_margin
from ..core.clock import now as clock_now
from ..core.config import Config


def budget_seconds(cfg: Config) -> tuple[float, float]:
    """-> (budget, margin) in seconds, as the start-up check computed them."""
    return budget_and_margin(cfg.budget, cfg.margin, cfg.mode)


class BudgetClock:
    """Seconds since the run started (possibly in an earlier process that was killed)."""

    def __init__(self, total_s: float, margin_s: float = 0.0, start_time: float | None = None):
        self.total_s, self.margin_s = float(total_s), float(margin_s)
        self.start_time = clock_now() if start_time is None else float(start_time)

    def elapsed(self) -> float:
        return clock_now() - self.start_time

    def remaining(self) -> float:
        return self.total_s - self.margin_s - self.elapsed()

    def fmt(self) -> str:
        return f"{fmt_seconds(self.elapsed())}/{fmt_seconds(self.total_s)}"


def fmt_seconds(s: float) -> str:
    s = max(0, int(s))
    h, m = divmod(s, 3600)
    m, sec = divmod(m, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


class InferenceReserve:
    """Time to keep for the final validation + test prediction, from measured throughput.

    `test_ips` comes from a probe before training (test images decoded from their files with the
    eval transform, TTA views counted: what the final prediction will really cost); `val_ips` from
    each validation pass (often cached images, so faster). Whichever is missing borrows the other;
    before either exists, inference is guessed from training speed (a forward pass costs about a
    third of forward+backward; assume half to stay safe). `startup_s` is the measured cost of a
    loader's first batch (worker start-up), paid twice: final validation and test loader.
    """

    def __init__(self, n_test: int, n_val: int, tta: int, overhead_s: float = 2.5, safety: float = 1.3):
        self.n_test, self.n_val, self.tta = n_test, n_val, tta
        self.overhead_s, self.safety = overhead_s, safety
        self.test_ips: float | None = None
        self.val_ips: float | None = None
        self.train_ips: float | None = None
        self.startup_s = 5.0  # until measured
        self._startup_measured = False
        # Work after training besides the final validation, at the validation rate: the weight
        # average's BatchNorm pass and its own validation (swa.py), with one more loader start-up.
        self.extra_images, self.extra_loaders = 0, 0

    @classmethod
    def measured(cls, n_test: int, n_val: int, tta: int, images_per_s: float, startup_s: float) -> InferenceReserve:
        """A reserve from a probe: inference speed (image-views/s) and a loader's first-batch latency."""
        reserve = cls(n_test, n_val, tta)
        reserve.test_ips = images_per_s
        reserve.observe_startup(startup_s)
        return reserve

    def observe_probe(self, probe: dict) -> None:
        """What predicting the first test batches measured (predictor.probe_inference): the speed, the
        loader's start-up, and its per-image set-up (rect reads every test header) for all test images."""
        self.test_ips = probe["images_per_s"]
        self.observe_startup(probe["startup_s"])
        self.overhead_s += probe.get("setup_s_per_image", 0.0) * self.n_test

    def observe_startup(self, seconds: float) -> None:
        """Keep the worst first-batch latency seen: persistent workers make later ones look free,
        but the test loader starts its workers from scratch."""
        self.startup_s = max(self.startup_s, seconds) if self._startup_measured else seconds
        self._startup_measured = True

    def seconds(self) -> float:
        guess = 2.0 * self.train_ips if self.train_ips else None
        test_rate = self.test_ips or self.val_ips or guess
        val_rate = self.val_ips or self.test_ips or guess
        fixed = self.overhead_s + (2 + self.extra_loaders) * self.startup_s
        if not test_rate:
            return fixed
        val_images = self.n_val + self.extra_images
        return fixed + self.safety * (self.n_test * self.tta / test_rate + val_images / val_rate)


def lr_factor(progress: float, warmup: float = 0.05, kind: str = "linear") -> float:
    """Multiplier of the peak LR at `progress` in [0, 1]: linear warmup, then decay to zero at 1."""
    p = min(max(progress, 0.0), 1.0)
    if warmup > 0 and p < warmup:
        return p / warmup
    q = (p - warmup) / max(1e-12, 1.0 - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - q)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * q))
    raise ValueError(f"unknown schedule {kind!r}; choose linear | cosine")


class Progress:
    """Where training is in [0, 1]: by time toward a (moving) deadline, or by steps.

    On resume it continues from the saved progress and spreads the rest of this session's slice
    (up to `end`; 1.0 unless the schedule is split over several Kaggle sessions) over the time left.
    """

    def __init__(self, clock: BudgetClock, start_progress: float = 0.0, total_steps: int = 0, end: float = 1.0):
        self.clock, self.p0, self.total_steps = clock, float(start_progress), total_steps
        self.end = max(float(end), self.p0)
        self.t0 = clock.elapsed()
        self.last = self.p0

    def at(self, deadline_s: float, step: int = 0) -> float:
        if self.total_steps:
            return min(1.0, step / self.total_steps)
        span = deadline_s - self.t0
        p = self.end if span <= 0 else self.p0 + (self.end - self.p0) * (self.clock.elapsed() - self.t0) / span
        # The deadline moves when the inference reserve is re-estimated; a later one must not take the
        # schedule (and the learning rate) backwards.
        self.last = max(self.last, min(self.end, p))
        return self.last


def affordable_tta(level: int, n_images: int, images_per_s: float | None, seconds_left: float) -> int:
    """The most TTA views (up to `level`) whose prediction fits in `seconds_left`; at least 1."""
    if not images_per_s or n_images == 0:
        return level
    per_view = n_images / images_per_s
    return max(1, min(level, int(seconds_left // max(per_view, 1e-9))))
''',
'kernelkit.engine.checkpoint': r'''"""Checkpoints: one owner for their names, one atomic write, a versioned format.

Writes happen in the background (`Checkpointer`): `save` copies the payload's tensors to CPU
memory (a snapshot training cannot change) and returns; one writer thread writes the snapshots in
order, each through `fileio.atomic_write` (temp file, fsync, os.replace), so at any instant best.pt
and last.pt on disk are the previous complete file or the new complete one, kill -9 included.
`Checkpointer.flush` waits for the queue; everything that reads a checkpoint back calls it first.

Format history (`format_version`):
  1  (no key) model, ema, optimizer, scaler, epoch, step, progress, best_score, threshold,
     elapsed, run_start, rng, config, classes, task; optionally threshold_rule.
  2  + format_version and seed; older files load through `migrate`. Optionally preprocess (the
     input mean/std; absent: ImageNet's), peak_score (the run's highest validation score, which
     best.pt may trail within noise; absent: best_score).

The inference folder (`export_inference`, INFERENCE_DIR) is what a submission needs and nothing
more: the predicting weights as model.safetensors, a timm config.json (other timm code loads it
with pretrained_cfg_overlay=dict(file=...)), and kernelkit.json with the classes, threshold rule,
input statistics and config. `load_checkpoint` reads it like a checkpoint.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ..core.fileio import atomic_write, write_json

log = logging.getLogger("kernelkit")

FORMAT_VERSION = 2
BEST, LAST = "best.pt", "last.pt"
INFERENCE_DIR = "model"
INFERENCE_META, INFERENCE_WEIGHTS = "kernelkit.json", "model.safetensors"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """weights_only=True: a checkpoint cannot run code when it is loaded. An inference folder loads
    as a checkpoint without optimizer or progress. `mmap`: tensors are read only when touched (for
    a look at the metadata of a checkpoint that will be loaded in full later)."""
    if Path(path).is_dir():
        return load_inference(Path(path), map_location)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001  (UnpicklingError and friends; re-raised with context)
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise ValueError(f"{path}: refusing checkpoint with pickled objects (weights_only=True): {e}") from e
        raise
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path}: not a kernelkit checkpoint (no 'model' entry)")
    return migrate(ckpt)


def migrate(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Bring an older checkpoint to the current format; newer ones are refused clearly."""
    version = int(ckpt.get("format_version", 1))
    if version > FORMAT_VERSION:
        raise ValueError(f"checkpoint format {version} is newer than this kernel understands ({FORMAT_VERSION}); "
                         "use the kernel.py that wrote it")
    if version == 1:
        ckpt = {**ckpt, "format_version": 2, "seed": ckpt.get("config", {}).get("seed")}
    return ckpt


PINNED_LIMIT = 2 << 30  # bytes of page-locked snapshot memory at most: a Kaggle VM has ~30 GB of RAM in all


class SnapshotArena:
    """Host buffers for snapshots, reused from one checkpoint to the next (a model's tensors have the
    same sizes every time) and never more than `limit` bytes in all. With `pin` (a GPU is there) they
    are page-locked, so the device-to-host copies are asynchronous; allocated per snapshot they were
    up to three full snapshots (model, EMA, SWA, 2x AdamW state) pinned and cached by the host
    allocator for good. Past the limit a tensor is copied to pageable memory, freed after its write."""

    def __init__(self, limit: int = PINNED_LIMIT, pin: bool | None = None):
        self.limit, self.pin = limit, torch.cuda.is_available() if pin is None else pin
        self.allocated = 0
        self.free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()  # taken by save (training thread) and give (writer thread)

    def take(self, nbytes: int) -> torch.Tensor | None:
        """A uint8 buffer of `nbytes` (reused when one is free), or None past the limit."""
        with self._lock:
            blocks = self.free.get(nbytes)
            if blocks:
                return blocks.pop()
            if self.allocated + nbytes > self.limit:
                return None
            try:
                buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
            except RuntimeError:  # no page-locked memory to be had: pageable copies from here on
                self.limit = self.allocated
                return None
            self.allocated += nbytes
            return buf

    def give(self, buffers: list[torch.Tensor]) -> None:
        """Back for reuse, once the snapshot that used them is written (or dropped)."""
        with self._lock:
            for b in buffers:
                self.free.setdefault(b.numel(), []).append(b)


def snapshot(obj: Any, arena: SnapshotArena | None = None) -> tuple[Any, list, list]:
    """A copy of `obj` that training can no longer change: every tensor in it (nested in dicts,
    lists, tuples) copied to CPU memory (the optimizer updates the weights in place right after),
    into `arena` buffers while they last. A CUDA tensor copied into a pinned buffer goes
    asynchronously, on the stream that computed it: the caller does not wait for the GPU, and later
    kernels on that stream cannot overwrite the values before the copy has read them.
    -> (copy, CUDA events to wait on before reading the copy, arena buffers to give back after)."""
    events: dict[torch.device, Any] = {}
    buffers: list[torch.Tensor] = []
    out = _copy(obj, events, arena, buffers)
    return out, ready_events(list(events)), buffers


def ready_events(devices: list[torch.device]) -> list:
    """One event per device, recorded now. blocking=True: the writer thread sleeps in synchronize()
    instead of spinning a CPU core (of 4 on Kaggle, which the loaders need) until the copy lands."""
    out = []
    for device in devices:
        with torch.cuda.device(device):
            event = torch.cuda.Event(blocking=True)
            event.record()
            out.append(event)
    return out


def _copy(obj: Any, events: dict, arena: SnapshotArena | None, buffers: list) -> Any:
    if isinstance(obj, torch.Tensor):
        return _copy_tensor(obj.detach(), events, arena, buffers)
    if isinstance(obj, dict):
        copied = copy.copy(obj)  # keeps the type and attributes (a state_dict's _metadata)
        for k, v in obj.items():
            copied[k] = _copy(v, events, arena, buffers)
        return copied
    if type(obj) in (list, tuple):
        return type(obj)(_copy(v, events, arena, buffers) for v in obj)
    return obj  # numbers, strings, None: immutable


def _copy_tensor(t: torch.Tensor, events: dict, arena: SnapshotArena | None, buffers: list) -> torch.Tensor:
    nbytes = t.numel() * t.element_size()
    buf = arena.take(nbytes) if arena is not None and nbytes else None
    if buf is None:
        return t.to("cpu", copy=True)  # pageable (a CUDA tensor: a synchronous copy)
    buffers.append(buf)
    host = buf.view(t.dtype).view(t.shape)
    async_copy = t.device.type == "cuda" and buf.is_pinned()
    if async_copy:
        events.setdefault(t.device, None)
    return host.copy_(t, non_blocking=async_copy)


class Checkpointer:
    """Writes best.pt / last.pt in `out_dir` with the run's metadata (config dict, classes, task,
    seed), in the background: `save` snapshots the payload to CPU memory and queues it for ONE writer
    thread, which writes the snapshots in order, each atomically. A last.pt still queued when a newer
    one comes is replaced by it (a best.pt is always written). At most `max_pending` snapshots wait:
    beyond that `save` waits for the writer, the only time training waits for a checkpoint (counted
    in `blocked_s` with the snapshot time; the writes' own time in `write_s`).

    A failed write is logged and counted in `failures`, never raised: training goes on, and the
    previous file is intact because the write is atomic. `flush` waits until every queued checkpoint
    is on disk; call it before reading one back. The writer is not a daemon thread and ends when the
    queue is empty, so a process that ends still finishes the writes it has queued."""

    def __init__(self, out_dir: Path, meta: dict[str, Any], max_pending: int = 2,
                 arena: SnapshotArena | None = None):
        self.out_dir, self.meta, self.max_pending = Path(out_dir), dict(meta), max_pending
        self.arena = arena or SnapshotArena()
        self.failures = self.written = 0
        self.blocked_s = self.write_s = 0.0
        self._queue: list[tuple[str, dict[str, Any], list, list]] = []
        self._writing = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def path(self, name: str) -> Path:
        return self.out_dir / name

    def save(self, name: str, payload: dict[str, Any]) -> bool:
        """Queue a checkpoint; -> True when accepted (its write's failure, if any, comes later and is
        counted in `failures`), False when not even the snapshot could be taken (counted too)."""
        t0 = time.perf_counter()
        try:
            with self._cond:
                while len(self._queue) >= self.max_pending and not self._queued(name):
                    self._cond.wait()
            state, ready, buffers = snapshot({**payload, **self.meta, "format_version": FORMAT_VERSION}, self.arena)
        except Exception as e:  # noqa: BLE001  (out of CPU memory for the copy: training goes on)
            self._failed(name, e)
            return False
        finally:
            self.blocked_s += time.perf_counter() - t0
        with self._cond:
            if name != BEST:  # a stale last.pt is not worth writing; the newer one keeps the order
                stale = [item for item in self._queue if item[0] == name]
                self._queue = [item for item in self._queue if item[0] != name]
                for item in stale:
                    self._release(item)
            self._queue.append((name, state, ready, buffers))
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_queued, name="kernelkit-checkpoints")
                self._thread.start()
        return True

    def _queued(self, name: str) -> bool:
        return name != BEST and any(item[0] == name for item in self._queue)

    def _failed(self, name: str, e: BaseException) -> None:
        with self._cond:  # counted from the writer thread and from save
            self.failures += 1
        log.error("could not save %s (%s: %s); the previous %s stays usable, training continues",
                  name, type(e).__name__, e, name)

    def _write_queued(self) -> None:
        """The writer thread: one checkpoint at a time, in order, until the queue is empty."""
        while True:
            with self._cond:
                if not self._queue:
                    self._thread = None
                    self._cond.notify_all()
                    return
                item = self._queue.pop(0)
                name, state, ready, _ = item
                self._writing = True
                self._cond.notify_all()  # room in the queue
            t0 = time.perf_counter()
            try:
                for event in ready:
                    event.synchronize()
                save_checkpoint(state, self.path(name))
                ok = True
            except Exception as e:  # noqa: BLE001  (torch.save raises RuntimeError on a full disk, not OSError)
                self._failed(name, e)
                ok = False
            del state
            self._release(item)
            del item
            with self._cond:
                self.written += int(ok)
                self.write_s += time.perf_counter() - t0
                self._writing = False
                self._cond.notify_all()

    def _release(self, item: tuple) -> None:
        """Give a written (or dropped) snapshot's buffers back for the next snapshot."""
        for event in item[2]:
            event.synchronize()  # a dropped snapshot's copies may still be in flight into its buffers
        self.arena.give(item[3])

    def flush(self) -> None:
        """Wait until every queued checkpoint is written (or has failed)."""
        with self._cond:
            while self._queue or self._writing:
                self._cond.wait()

    def finish(self) -> dict[str, Any]:
        """Flush, log what checkpointing cost, -> the numbers for summary.json."""
        self.flush()
        if self.written or self.failures:
            log.info("checkpoints: %d written, %d failed, caller blocked %.2f s, writing took %.2f s in the "
                     "background", self.written, self.failures, self.blocked_s, self.write_s)
        return {"checkpoints_written": self.written, "checkpoint_blocked_s": round(self.blocked_s, 3),
                "checkpoint_write_s": round(self.write_s, 3)}

    def update(self, name: str, **fields: Any) -> bool:
        """Add fields (e.g. the final threshold rule) to an existing checkpoint; returns once the new
        file is written (True) or has failed (False)."""
        self.flush()
        path = self.path(name)
        if not path.is_file():
            return False
        try:
            ckpt = load_checkpoint(path)
        except Exception as e:  # noqa: BLE001
            log.error("could not read %s back to update it (%s)", name, e)
            return False
        failures = self.failures
        accepted = self.save(name, {**ckpt, **fields})
        self.flush()
        return accepted and self.failures == failures


def inference_weights(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights that were validated: the EMA when training kept one."""
    return ckpt.get("ema") or ckpt["model"]


def _timm_config(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """config.json as timm.models.save_for_hf writes it, for a plain timm model (no custom head)."""
    cfg, pre = ckpt.get("config", {}), ckpt.get("preprocess") or {}
    if cfg.get("head", "linear") != "linear" or cfg.get("model2"):
        return None
    size = int(cfg.get("img_size", 224))
    pretrained_cfg = {"input_size": [3, size, size], "crop_pct": 1.0, "num_classes": len(ckpt["classes"]),
                      **{k: pre[k] for k in ("mean", "std", "interpolation") if k in pre}}
    return {"architecture": str(cfg["model"]).split(".")[0], "num_classes": len(ckpt["classes"]),
            "label_names": list(ckpt["classes"]), "pretrained_cfg": pretrained_cfg}


def export_inference(ckpt: dict[str, Any], folder: Path) -> Path:
    """Write the inference folder from a checkpoint; replaces an older folder only once complete."""
    from safetensors.torch import save_file
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # safetensors refuses tensors sharing memory (tied weights); contiguous clones own theirs.
    save_file({k: v.detach().clone().contiguous() for k, v in inference_weights(ckpt).items()},
              str(tmp / INFERENCE_WEIGHTS))
    meta = {k: ckpt.get(k) for k in ("config", "classes", "task", "threshold", "threshold_rule", "preprocess",
                                     "best_score", "seed")}
    write_json(tmp / INFERENCE_META, {**meta, "format_version": FORMAT_VERSION})
    timm_cfg = _timm_config(ckpt)
    if timm_cfg is not None:
        write_json(tmp / "config.json", timm_cfg)
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_inference(folder: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    from safetensors.torch import load_file
    meta_path, weights_path = folder / INFERENCE_META, folder / INFERENCE_WEIGHTS
    if not meta_path.is_file() or not weights_path.is_file():
        raise ValueError(f"{folder}: not a kernelkit inference folder (needs {INFERENCE_META} and {INFERENCE_WEIGHTS})")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    device = str(map_location) if not isinstance(map_location, str) else map_location
    return migrate({**meta, "model": load_file(str(weights_path), device=device)})


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        # A checkpoint from a machine with more GPUs (T4 x2 -> one GPU): restore what exists here.
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
''',
'kernelkit.engine.evaluate': r'''"""Batch-wise prediction with test-time augmentation; probabilities averaged over views."""
from __future__ import annotations

import contextlib
from collections import deque
from typing import Callable, Sequence

import numpy as np
import torch

from ..core.clock import now as clock_now
from ..core.progress import progress
from ..data.loaders import DeviceFeeder, loader_order, loader_tiles
from ..data.transforms import Preprocess, fold_tiles, normalize, pool_tiles, tta_identity
from .resolution import resize_batch


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype = torch.float16):
    """Mixed precision on CUDA only: CPU autocast (bf16) is slower than fp32 on most CPUs."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


OutOfMemory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _average_views(model, x, views, act, device, amp, amp_dtype, tiles: int = 1) -> torch.Tensor:
    """Probabilities averaged over the views; with tiles, each view's logits pooled over an image's tiles."""
    with autocast(device, amp, amp_dtype):
        return sum(act(pool_tiles(model(view(x)).float(), tiles)) for view in views) / len(views)


def activation(task: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return torch.sigmoid if task == "multilabel" else _softmax


def _softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=1)


class HostChunks:
    """Per-batch results moved to host memory as they come, so the device holds one batch of them
    at a time (200k images x 15k classes is 12 GB: kept on a T4 until the end, it overflows it).

    On CUDA each batch is copied without blocking into one of `ring` reused pinned staging buffers
    (pinned memory per batch would stay page-locked in torch's host cache: 12 GB of it), and moved
    to pageable memory when its buffer comes round again, `ring` batches later: that waits for
    that batch's copy only, long done, never for the work queued since. `gather` lands the rest."""

    def __init__(self, device: torch.device, ring: int = 4):
        self.device, self.ring, self.chunks = device, ring, []
        self.pin = device.type == "cuda"
        self.pending: deque = deque()  # (staging buffer, event, chunk index) of copies in flight
        self.free: dict[tuple, list[torch.Tensor]] = {}

    def add(self, t: torch.Tensor) -> None:
        if not self.pin:
            host = torch.empty(t.shape, dtype=t.dtype)
            host.copy_(t)  # a copy owning its memory: nothing of the batch outlives it
            self.chunks.append(host)
            return
        if len(self.pending) >= self.ring:
            self._land(self.pending.popleft())
        key = (tuple(t.shape), t.dtype)
        staging = self.free.get(key, [])
        buf = staging.pop() if staging else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.chunks.append(None)
        self.pending.append((buf, event, len(self.chunks) - 1))

    def _land(self, item: tuple) -> None:
        buf, event, i = item
        event.synchronize()
        self.chunks[i] = buf.clone()
        self.free.setdefault((tuple(buf.shape), buf.dtype), []).append(buf)

    def __len__(self) -> int:
        return len(self.chunks)

    def gather(self) -> torch.Tensor | None:
        while self.pending:
            self._land(self.pending.popleft())
        self.free.clear()  # the staging buffers go back to torch's host cache: `ring` batches at most
        return torch.cat(self.chunks) if self.chunks else None


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device: torch.device, task: str,
            views: Sequence[Callable] = (tta_identity,), amp: bool = True, channels_last: bool = False,
            desc: str = "predict", stop=None, *, pre: Preprocess, amp_dtype: torch.dtype = torch.float16,
            size: int = 0) -> dict:
    """-> {probs (N, C) float32, ok (N,) bool, seconds, first_batch_s, startup_s, images_per_s}.

    images_per_s counts image-views after the first batch, so worker start-up (seconds under
    spawn) does not distort the estimate the budget planner uses; first_batch_s holds that cost.
    `stop` (stopping.StopFlag): once raised, the remaining batches get the first view only, so a
    SIGTERM still ends with a prediction for every row, soon. `size` > 0: every image (tile) is
    downscaled to size x size first (validation during progressive resizing's smaller stages).
    """
    model.eval()
    act = activation(task)
    probs, oks = HostChunks(device), HostChunks(device)
    t0 = clock_now()
    t_first, first_rows = None, 0
    pieces = 1  # after an out-of-memory, the batches that follow are split as far as that one needed
    # Batches arrive on the device a step ahead (DeviceFeeder); the probabilities leave it as they are
    # made (HostChunks: non-blocking copies into pinned memory), so neither waits for the GPU.
    tiles = loader_tiles(loader)
    for images, _, ok in progress(DeviceFeeder(loader, device), desc=desc):
        x, t = fold_tiles(images, tiles)  # tiles mode: (N, 3, T*s, s) columns -> N*T squares
        x = resize_batch(x, size) if size else x
        x = normalize(x, channels_last, pre)
        use = views[:1] if stop is not None and stop.requested else views
        p, pieces = _predict_batch(model, x, len(ok), use, act, device, amp, amp_dtype, t, pieces)
        probs.add(p)
        oks.add(ok > 0)
        if t_first is None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the first batch's true cost: loader start-up, lazy init
            t_first, first_rows = clock_now(), len(p)
    probs_all = probs.gather()
    probs_all = probs_all.numpy() if probs_all is not None else np.zeros((0, 0), np.float32)
    oks_all = oks.gather()
    oks_all = oks_all.numpy() if oks_all is not None else np.zeros(0, bool)
    order = loader_order(loader)
    if order is not None:  # rect buckets: rows back in the dataset's order
        probs_all[order], oks_all[order] = probs_all.copy(), oks_all.copy()
    t_end = clock_now()
    n, batches = len(probs_all), len(probs)
    steady_n = n - (first_rows if batches > 1 else 0)
    steady_s = (t_end - t_first) if batches > 1 else (t_end - t0)
    ips = steady_n * len(views) / max(steady_s, 1e-9)
    first_batch_s = (t_first or t_end) - t0
    return {
        "probs": probs_all,
        "ok": oks_all,
        "seconds": t_end - t0,
        "first_batch_s": first_batch_s,
        # what the first batch cost beyond its own share of the work: worker start-up, lazy init
        "startup_s": max(0.0, first_batch_s - first_rows * len(views) / ips) if batches > 1 else first_batch_s,
        "images_per_s": ips,
    }


def _predict_batch(model: torch.nn.Module, x: torch.Tensor, n_images: int, views: Sequence[Callable], act: Callable,
                   device: torch.device, amp: bool, amp_dtype: torch.dtype, tiles: int,
                   pieces: int) -> tuple[torch.Tensor, int]:
    """One batch's probabilities, in `pieces` parts; a batch that does not fit in memory is split in
    halves until it does, so the predictions are never lost to one large batch (an image's tiles stay
    in one piece). -> (probabilities, the pieces that fitted)."""
    while True:
        try:
            per = tiles * -(-n_images // pieces)
            return torch.cat([_average_views(model, part, views, act, device, amp, amp_dtype, tiles)
                              for part in x.split(per)]), pieces
        except OutOfMemory:
            if pieces >= n_images:
                raise
            pieces *= 2
            if device.type == "cuda":
                torch.cuda.empty_cache()
''',
'kernelkit.engine.learning_check': r'''"""Is the network learning at all? A validation score still at the label prior (what a constant
prediction scores) after a quarter of the training time means the rest of the budget is likely
wasted too: say so loudly, with the usual causes, while there is still time to stop and fix it.
Training goes on: a late start happens, and the submission is still written."""
from __future__ import annotations

from ..core.config import PRESETS, Config
from ..core.weights import weights_given

CHECK_AT = 0.25  # share of training (time, or steps with fixed epochs) after which the check runs
# "At the prior": closed less than this share of the gap between the prior and a perfect score. The prior
# is the exact best constant answer while a multi-label epoch is scored at its settled threshold (up to
# ~3 images below its exact best, rules.settled_threshold): small next to this share.
GAP_SHARE = 0.1


def at_prior(score: float, prior: float, gap_share: float = GAP_SHARE) -> bool:
    return score < prior + gap_share * (1.0 - prior)


def stuck_message(score: float, prior: float, progress: float, metric: str, causes: str) -> str:
    return (f"validation {metric} {score:.4f} is still at the label prior ({prior:.4f}) after {progress:.0%} of "
            f"training: the model is not learning. Likely causes: {causes or 'see the README'}")


def likely_causes(cfg: Config) -> str:
    """The usual suspects for this config, most likely first."""
    causes = []
    if not weights_given(cfg.pretrained_path):
        if cfg.preset and cfg.preset != "demo" and cfg.preset in PRESETS:
            causes.append(f"preset {cfg.preset!r} was made for ImageNet weights but pretrained_path is empty "
                          "(random init): attach the weights and set pretrained_path")
        else:
            causes.append("random init (no pretrained_path) needs many epochs: a smaller model or img_size "
                          "(model='auto', img_size=0) fits more")
    causes.append(f"lr={cfg.lr:g} too high (loss flat or rising: try a tenth) or too low (loss barely falling: "
                  "try ten times)")
    if cfg.loss != "auto" or cfg.loss_args:
        causes.append(f"loss={cfg.loss!r} {cfg.loss_args!r} may not suit these labels: try loss='auto'")
    if cfg.freeze >= 1:
        causes.append("freeze=1 trains only the head: without pretrained weights that cannot work")
    causes.append("labels that do not follow from the images (check id_column/label_column)")
    return "; ".join(causes)
''',
'kernelkit.engine.plan': r'''"""Dry-run planner: measure throughput on a few batches, then lay the full budget out.

Throughput is measured on the machine the dry run runs on; run it on the Kaggle accelerator (a
short interactive session) for a plan that holds there.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .budget import InferenceReserve, fmt_seconds


@dataclass
class Plan:
    budget_s: float
    margin_s: float
    setup_s: float
    train_images_per_s: float
    infer_images_per_s: float
    n_train: int
    n_val: int
    n_test: int
    tta: int
    epoch_s: float
    inference_s: float
    train_s: float
    epochs_that_fit: float
    epochs_requested: int
    fits: bool
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [
            ("budget", fmt_seconds(self.budget_s)),
            ("safety margin", fmt_seconds(self.margin_s)),
            ("setup (imports, data index, model)", fmt_seconds(self.setup_s)),
            ("training throughput", f"{self.train_images_per_s:.1f} images/s"),
            ("inference throughput", f"{self.infer_images_per_s:.1f} image-views/s"),
            ("one epoch (train + validation)", f"{fmt_seconds(self.epoch_s)} for {self.n_train} + {self.n_val} images"),
            (f"inference ({self.n_test} test images x {self.tta} TTA views + final validation)",
             fmt_seconds(self.inference_s)),
            ("time left for training", fmt_seconds(self.train_s)),
            ("epochs that fit", f"{self.epochs_that_fit:.1f}"
             + (f" (requested {self.epochs_requested})" if self.epochs_requested else " (schedule follows the clock)")),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"  {k:<{width}}  {v}" for k, v in rows]
        lines += [f"  WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def make_plan(*, budget_s: float, margin_s: float, setup_s: float, train_ips: float, reserve: InferenceReserve,
              n_train: int, epochs: int = 0) -> Plan:
    """The budget laid out with the live run's own numbers: inference is `reserve.seconds()`, what
    training keeps back (measured speeds, loader start-ups, overhead, the weight average's extra
    work), so the plan predicts what training will do."""
    infer_ips = reserve.test_ips or reserve.val_ips
    if not infer_ips:
        raise ValueError("a plan needs a measured inference speed (reserve.test_ips)")
    val_s = reserve.n_val / (reserve.val_ips or infer_ips)
    epoch_s = n_train / train_ips + val_s
    inference_s = reserve.seconds()
    train_s = budget_s - margin_s - setup_s - inference_s
    fit_epochs = max(0.0, train_s / epoch_s)
    warnings = []
    if train_s <= 0:
        warnings.append("no time left to train: inference alone needs more than the budget; "
                        "lower tta, img_size or pick a faster model")
    elif fit_epochs < 1:
        warnings.append(f"less than one epoch fits ({fit_epochs:.2f}); the schedule still ends at the deadline")
    if epochs and epochs > fit_epochs:
        warnings.append(f"epochs={epochs} does not fit: ~{fit_epochs:.1f} do; training will stop at the deadline "
                        "with the LR not yet decayed (use epochs=0 to schedule over time)")
    return Plan(budget_s=budget_s, margin_s=margin_s, setup_s=setup_s, train_images_per_s=train_ips,
                infer_images_per_s=infer_ips, n_train=n_train, n_val=reserve.n_val, n_test=reserve.n_test,
                tta=reserve.tta, epoch_s=epoch_s, inference_s=inference_s, train_s=train_s, epochs_that_fit=fit_epochs,
                epochs_requested=epochs, fits=not warnings, warnings=warnings)
''',
'kernelkit.engine.resolution': r'''"""Progressive resizing over the wall clock: train at a lower resolution early, at the full
`img_size` for the last part of the schedule.

FFCV and fastai step the resolution by epoch; here the stages are shares of the schedule's
progress (`FitState.progress`, the clock-based progress the LR schedule follows), so each stage
takes a fixed share of the WALL CLOCK whatever the throughput turns out to be, and a resumed run
continues at the size its restored progress calls for. With fixed `epochs` the progress is the
share of steps, the same way.

The cache holds every image at the full `img_size`; a lower stage is made by downscaling the batch
on the training device (`resize_batch`, antialiased bilinear: cheap on a GPU), so the cache already
holds what each stage needs and nothing is decoded twice. Validation during a smaller stage runs at
that stage's size (a network trained at half size validated at full size scores near chance while it
learns: issue #20); the best checkpoint is chosen among validations at the largest size reached; the
final prediction (TTA) runs at the full size. Few distinct sizes (at most `MAX_STAGES`): torch.compile recompiles and cudnn.benchmark
re-tunes per input shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.images import rect_bucket, rect_shape

MAX_STAGES = 4  # distinct sizes, the full one included
MIN_PX = 32  # a stride-32 backbone's last feature map is 1 x 1 here


def size_step(full: int) -> int:
    """Stage sizes are multiples of this: 32 keeps a stride-32 network's feature maps whole at
    large sizes; small images need finer steps to have stages at all."""
    return 32 if full >= 128 else 8


@dataclass(frozen=True)
class ResolutionSchedule:
    """`start_fraction * full` px at progress 0, up to `full` px from `full_at` on, in at most
    `stages` steps laid evenly over [0, full_at), each rounded down to a multiple of `step` and never
    below `min_px`. start_fraction 0 (or >= 1): always `full`."""
    full: int
    start_fraction: float = 0.0
    full_at: float = 0.75
    step: int = 0  # 0: size_step(full)
    stages: int = MAX_STAGES
    min_px: int = MIN_PX

    @property
    def enabled(self) -> bool:
        return 0 < self.start_fraction < 1 and len(set(self.sizes())) > 1

    def sizes(self) -> list[int]:
        """The size of each stage, smallest first, the last one `full` (may repeat when the
        rounding merges neighbours)."""
        if not 0 < self.start_fraction < 1 or self.stages < 2:
            return [self.full]
        step = self.step or size_step(self.full)
        lo = min(self.full, max(self.min_px, self.start_fraction * self.full))
        out = []
        for i in range(self.stages - 1):
            want = lo + (self.full - lo) * i / (self.stages - 1)
            out.append(min(self.full, max(self.min_px, int(want // step) * step)))
        return [*out, self.full]

    def size_at(self, progress: float) -> int:
        """The input size at schedule progress `progress` (0..1): non-decreasing, `full` from full_at on."""
        sizes = self.sizes()
        if len(sizes) == 1 or progress >= self.full_at:
            return self.full
        i = int(max(progress, 0.0) / self.full_at * (len(sizes) - 1))
        return sizes[min(i, len(sizes) - 1)]

    def spans(self) -> list[tuple[int, float, float]]:
        """(size, from progress, to progress) of each distinct stage, adjacent equal sizes merged."""
        sizes = self.sizes()
        if len(sizes) == 1:
            return [(self.full, 0.0, 1.0)]
        n = len(sizes) - 1
        out: list[tuple[int, float, float]] = []
        for i, s in enumerate(sizes):
            a, b = (self.full_at * i / n, self.full_at * (i + 1) / n) if i < n else (self.full_at, 1.0)
            if out and out[-1][0] == s:
                out[-1] = (s, out[-1][1], b)
            else:
                out.append((s, a, b))
        return out

    def shares(self) -> dict[int, float]:
        """{size: share of the schedule's progress spent at it}."""
        return {s: b - a for s, a, b in self.spans()}

    def describe(self) -> str:
        spans = self.spans()
        parts = [f"{s} px until p={b:.2f}" for s, _, b in spans[:-1]]
        return ", ".join([*parts, f"then {spans[-1][0]} px"])


def schedule_from(img_size: int, start: float, full_at: float) -> ResolutionSchedule | None:
    """The config's schedule, or None when off (start 0) or when the rounding leaves one size."""
    if not img_size or not 0 < start < 1:
        return None
    sched = ResolutionSchedule(img_size, start, full_at)
    return sched if sched.enabled else None


def fixed_input_size(model: torch.nn.Module) -> bool:
    """True for a model that takes only the size it was built for: timm's patch embedding with
    `strict_img_size` (ViT, DeiT, Swin built without dynamic_img_size) asserts on any other."""
    return any(getattr(m, "strict_img_size", False) for m in model.modules())


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) on the 0..255 scale (uint8 or float, contiguous or channels-last) -> size x size
    (a rect batch: its bucket's shape at `size`) on the same device, antialiased bilinear, same dtype
    and memory format; x itself at that size."""
    h, w = x.shape[-2:]
    out = (size, size) if h == w else rect_shape(rect_bucket(w, h), size)  # a rect bucket at the stage's size
    if (h, w) == out:
        return x
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    y = F.interpolate(x.float(), size=out, mode="bilinear", antialias=True, align_corners=False)
    y = y.clamp_(0, 255)  # the antialiasing filter's rounding may step a hair past the range
    if x.dtype == torch.uint8:
        y = y.round_().to(torch.uint8)
    elif y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def effective_ips(ips_at: dict[int, float], schedule: ResolutionSchedule | None, over_clock: bool = True) -> float:
    """Training images/s over the whole schedule, from the throughput at each stage size.

    Over the clock (epochs=0) each stage has a fixed share of the TIME: the time-weighted mean.
    Over steps (fixed epochs) each stage has a fixed share of the IMAGES: the harmonic mean."""
    if schedule is None:
        return ips_at[max(ips_at)]
    shares = schedule.shares()
    if over_clock:
        return sum(w * ips_at[s] for s, w in shares.items())
    return 1.0 / sum(w / max(ips_at[s], 1e-9) for s, w in shares.items())


def epochs_with_schedule(train_s: float, n_train: int, ips_at: dict[int, float],
                         schedule: ResolutionSchedule | None) -> float:
    """Epochs that fit `train_s` seconds of training (the planners' arithmetic, validation aside)."""
    return train_s * effective_ips(ips_at, schedule) / max(n_train, 1)


def ips_by_pixels(sizes: list[int], measured: dict[int, float]) -> dict[int, float]:
    """Throughput at every size of `sizes` from two (or more) measured sizes: time per image taken
    as linear in the pixel count (a fixed per-image cost plus a per-pixel one), fitted through the
    smallest and the largest measurement; a single measurement scales with the pixel count."""
    lo, hi = min(measured), max(measured)
    t_lo, t_hi = 1 / measured[lo], 1 / measured[hi]
    if lo == hi:
        return {s: measured[hi] * (hi / s) ** 2 for s in sizes}
    slope = (t_hi - t_lo) / (hi * hi - lo * lo)
    out = {}
    for s in sizes:
        t = t_lo + slope * (s * s - lo * lo)
        out[s] = measured[s] if s in measured else 1 / max(t, min(t_lo, t_hi) * 1e-3)
    return out


def fmt_ips(ips_at: dict[int, float]) -> str:
    return ", ".join(f"{s} px {v:.1f} img/s" for s, v in sorted(ips_at.items()) if math.isfinite(v))
''',
'kernelkit.engine.resume': r'''"""Continuing a schedule: after a kill in the same out_dir, or in a later Kaggle session.

A Kaggle GPU session lasts at most 9 hours, so one learning-rate schedule can be laid over
`sessions` of them. Session k trains its slice of the schedule and saves; the next session, given
the earlier output as `resume_from=.../last.pt`, continues where the schedule stopped, with its own
budget, inference reserve and submission.

Slices. With a wall-clock schedule (epochs=0) session k covers progress [(k-1)/N, k/N] over its
own training time: the progress left is shared evenly by the sessions left, so a session that
stopped early (a SIGTERM, a crash) hands the rest of its slice to the ones after it. With fixed
epochs, the epochs are split the same way (epoch boundaries, at least one per session). A restart
of the same session after a kill keeps the slice stored in its checkpoint.

Refused at start (exit 2), before any data is read: a finished schedule (it would train at LR 0;
predict with --mode infer instead), and a checkpoint whose schedule, model or data split differ
from this run's (SCHEDULE_KEYS), e.g. another `sessions` value.
"""
from __future__ import annotations

import logging
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..core.checks import MAX_TILES
from ..core.config import Config, ConfigError
from ..inputs.competition import Competition
from .checkpoint import load_checkpoint
from .trainer import FitState, TrainParts, TrainState

log = logging.getLogger("kernelkit")

# What must not change between the sessions of one schedule: the schedule itself, the model, and
# the validation split (another split would validate on images the model trained on).
SCHEDULE_KEYS = ("sessions", "epochs", "schedule", "warmup", "lr", "swa", "freeze", "frozen_stages", "model", "model2",
                 "head", "fold", "n_folds", "val_fraction", "seed", "max_train_images")


def config_differences(trained: dict[str, Any], cfg: Config) -> list[str]:
    """'key: checkpoint X, now Y' for every schedule-defining option that differs (batch_size too with
    fixed epochs: it sets the number of steps). A key older checkpoints lack counts as its default."""
    defaults = {f.name: f.default for f in fields(Config)}
    keys = SCHEDULE_KEYS + (("batch_size",) if cfg.epochs else ())
    return [f"{k}: checkpoint {trained.get(k, defaults[k])!r}, now {getattr(cfg, k)!r}" for k in keys
            if trained.get(k, defaults[k]) != getattr(cfg, k)]


def stored_input_mode(config: dict[str, Any]) -> tuple[str, int] | None:
    """(mode, tiles) a saved config trained with: pad, squeeze, rect (tiles 0) or tiles with its count; a config
    from before the option trained on pad. None for a damaged one."""
    try:
        mode, tiles = str(config.get("input_mode", "pad")), int(config.get("tiles", 0) or 0)
    except (TypeError, ValueError):
        return None
    if mode == "tiles":
        return (mode, tiles) if 2 <= tiles <= MAX_TILES else None
    return (mode, 0) if mode in ("pad", "squeeze", "rect") else None


def describe_input_mode(mode_tiles: tuple[str, int] | None) -> str:
    if mode_tiles is None:
        return "an unreadable mode"
    mode, tiles = mode_tiles
    return f"tiles x{tiles}" if mode == "tiles" else mode


def same_model(ckpt: dict[str, Any], cfg: Config, classes: list) -> bool:
    return ckpt.get("classes") == classes and ckpt.get("config", {}).get("model") == cfg.model


def continues(ckpt: dict[str, Any], cfg: Config, classes: list) -> bool:
    """Whether check_resume takes `ckpt` for this run rather than refusing it or starting fresh."""
    return same_model(ckpt, cfg, classes) and not config_differences(ckpt.get("config", {}), cfg)


def check_resume(cfg: Config, path: Path | None, comp: Competition, explicit: bool) -> dict[str, Any] | None:
    """The checkpoint to continue from, checked before anything slow: one of another model, label set
    or schedule, or a finished schedule given as resume_from, is refused now (not re-trained at LR 0).
    A restart in the same out_dir (not `explicit`) with a changed config starts fresh instead."""
    if path is None:
        return None
    ckpt = load_checkpoint(path)
    trained = ckpt.get("config", {})
    if not same_model(ckpt, cfg, comp.classes):
        if explicit:
            raise ConfigError(f"resume_from {path}: trained a different model or label set "
                              f"({trained.get('model')!r}, {len(ckpt.get('classes', []))} classes)")
        log.warning("%s belongs to a different model or label set; starting fresh", path)
        return None
    differ = config_differences(trained, cfg)
    if differ and explicit:
        raise ConfigError(f"resume_from {path}: its schedule was made with other settings ({'; '.join(differ)}). "
                          "Every session of one schedule needs the same values: set them as the checkpoint has "
                          "them, or start a new schedule (leave resume_from empty)")
    if differ:
        log.warning("%s was trained with other settings (%s); starting fresh", path, "; ".join(differ))
        return None
    was, now = stored_input_mode(trained), stored_input_mode(cfg.to_dict())
    if was != now:  # allowed (the weights take any size), but the model has not seen images this way
        log.warning("!!! %s trained on input_mode %s; this run feeds it %s (input_mode set). Leave input_mode "
                    "auto to keep the checkpoint's", path, describe_input_mode(was), describe_input_mode(now))
    finished = (ckpt["epoch"] >= cfg.epochs) if cfg.epochs else ckpt["progress"] >= 0.999
    if finished and explicit:
        raise ConfigError(
            f"resume_from {path}: its schedule already finished (session {ckpt.get('session', 1)} of "
            f"{trained.get('sessions', 1)}, epoch {ckpt['epoch']}, progress {ckpt['progress']:.3f}); training on "
            f"would run at learning rate 0. To predict with it use --mode infer --checkpoints {path}; to train "
            "more, start a new schedule (leave resume_from empty)")
    return ckpt


def first_slice(sessions: int, epochs: int) -> float:
    if epochs:
        return max(1, round(epochs / sessions)) / epochs
    return 1.0 / sessions


def next_slice(ckpt: dict[str, Any], sessions: int, epochs: int) -> tuple[int, float]:
    """-> (this session's number, progress at which its slice ends) after the checkpoint's session."""
    done = int(ckpt.get("session", 1))
    left = sessions - done
    if left < 1:
        log.warning("the checkpoint is from session %d of %d but its schedule is not finished (progress %.3f): "
                    "this extra session trains the rest", done, sessions, ckpt["progress"])
        left = 1
    if epochs:
        e0 = int(ckpt["epoch"])
        return done + 1, min(epochs, max(e0 + 1, e0 + round((epochs - e0) / left))) / epochs
    p0 = float(ckpt["progress"])
    return done + 1, p0 + (1.0 - p0) / left


def restore(ckpt: dict[str, Any] | None, parts: TrainParts, path: Path | None, cfg: Config,
            new_session: bool) -> FitState:
    """Weights, optimizer, RNG and schedule position from `ckpt`, and this session's slice. A new
    session selects its own best epoch (its output folder stands alone: best.pt, val_probs, rule)."""
    if ckpt is None:
        state = FitState(session=1, session_end=first_slice(cfg.sessions, cfg.epochs))
    else:
        state = FitState()
        TrainState(parts, state).load_state_dict(ckpt)
        if new_session:
            state.session, state.session_end = next_slice(ckpt, cfg.sessions, cfg.epochs)
            state.best_score = state.peak_score = -math.inf
        log.info("resumed from %s: epoch %d, step %d, progress %.3f", path, state.epoch, state.step, state.progress)
    if cfg.sessions > 1:
        log.info("session %d of %d: this session trains the schedule from progress %.3f to %.3f", state.session,
                 cfg.sessions, state.progress, state.session_end)
    return state
''',
'kernelkit.engine.run_state': r'''"""Run bookkeeping in out_dir: when the run started, whether it finished, which checkpoint to resume.

A run killed mid-way (kill -9, a lost Kaggle session) and started again in the same out_dir
continues from last.pt, and the time the killed process spent still counts against the budget.
A finished run's checkpoints are kept as *.prev.pt so a new run never mixes them with its own.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..core.fileio import TEMP_GLOB, write_json
from .checkpoint import BEST, LAST

log = logging.getLogger("kernelkit")


def _record(path: Path, data: dict) -> None:
    """Bookkeeping must not stop a run: on a full disk the run goes on, only a restart loses its start time."""
    try:
        write_json(path, data)
    except Exception as e:  # noqa: BLE001
        log.error("could not write %s (%s); a restart after a kill would not resume", path.name, e)

STATE_FILE = "run_state.json"
CHECKPOINTS = (LAST, BEST)


def remove_partial_files(out_dir: Path) -> None:
    """Temp files of a save that was killed half-way; the real checkpoints are intact beside them."""
    for tmp in out_dir.glob(TEMP_GLOB):
        log.info("removing partial file %s left by an interrupted save", tmp.name)
        tmp.unlink(missing_ok=True)


def begin_run(out_dir: Path, resume: bool, started_at: float) -> tuple[float, Path | None]:
    """-> (run start time for the budget clock, checkpoint to resume from or None)."""
    remove_partial_files(out_dir)
    state_path = out_dir / STATE_FILE
    last = resumable(out_dir, resume)
    if last is not None:
        state = json.loads(state_path.read_text())
        _record(state_path, {**state, "restarts": int(state.get("restarts", 0)) + 1})
        return float(state["run_start"]), last
    archive_checkpoints(out_dir)
    _record(state_path, {"run_start": started_at, "finished": False, "restarts": 0})
    return started_at, None


def resumable(out_dir: Path, resume: bool) -> Path | None:
    """last.pt of an unfinished run in out_dir, when resuming is on; no side effects."""
    state_path, last = out_dir / STATE_FILE, out_dir / LAST
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    return last if resume and state and not state.get("finished") and last.is_file() else None


def run_start(out_dir: Path, default: float) -> float:
    """When the run in out_dir started (possibly in a process killed since); `default` if unknown."""
    try:
        return float(json.loads((out_dir / STATE_FILE).read_text())["run_start"])
    except (OSError, ValueError, KeyError):
        return default


def archive_checkpoints(out_dir: Path) -> None:
    for name in CHECKPOINTS:
        p = out_dir / name
        if p.is_file():
            os.replace(p, p.with_suffix(".prev.pt"))
            log.info("kept the previous run's %s as %s", name, p.with_suffix(".prev.pt").name)


def finish_run(out_dir: Path) -> None:
    state_path = out_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    _record(state_path, {**state, "finished": True})
''',
'kernelkit.engine.swa': r'''"""Cheap weight averaging over the end of the schedule (SWA: Izmailov et al., "Averaging Weights
Leads to Wider Optima and Better Generalization", UAI 2018).

Over the last `swa` share of the schedule every step's weights go into a running average
(buffers included, so the average is usable even if the BatchNorm pass is skipped). The container
is `torch.optim.swa_utils.AveragedModel` (its state_dict format), but the update is ours: its
update_parameters sends integer buffers (BatchNorm's num_batches_tracked) through
`_foreach_addcdiv_` on CUDA, which raises on the second update, and reads `n_averaged` on the host
twice per step. Here floating tensors are averaged with one foreach lerp, integer ones copied, and
the count is a host integer. After training, the average's BatchNorm statistics are recomputed on a
few training batches (the averaged weights never produced the running statistics they carry), it is
validated, and it replaces best.pt only when it scores at least as well as the last and the best
weights. The BatchNorm pass and the extra validation are charged to the inference reserve up front.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from ..data.loaders import loader_tiles
from ..data.transforms import Preprocess, fold_tiles, normalize
from ..decide.rules import score_validation
from ..model.factory import BUCKET_NORM_MARK, FROZEN_MARK, hold_frozen_norms
from .evaluate import autocast, predict

log = logging.getLogger("kernelkit")

BN_BATCHES = 50  # enough batches for stable BatchNorm statistics; the pass costs about one forward each


class WeightAverage:
    """The running average of the weights from progress `1 - share` on."""

    def __init__(self, model: torch.nn.Module, share: float, bn_batches: int = BN_BATCHES):
        self.share, self.start, self.bn_batches = share, 1.0 - share, bn_batches
        self.avg = AveragedModel(model, use_buffers=True)
        self.count = 0  # snapshots averaged, on the host (avg.n_averaged mirrors it on the device)

    @property
    def module(self) -> torch.nn.Module:
        return self.avg.module

    @property
    def n(self) -> int:
        return self.count

    def update(self, model: torch.nn.Module, progress: float) -> None:
        if progress >= self.start:
            average_into(self.avg.module, model, self.count)
            self.count += 1
            self.avg.n_averaged.fill_(self.count)  # a device-side fill, no host read

    def state_dict(self) -> dict[str, Any]:
        return self.avg.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.avg.load_state_dict(state)
        self.count = int(self.avg.n_averaged)  # once, on resume

    def extra_images(self, train_loader: Any, n_val: int) -> tuple[int, int]:
        """-> (images, loader start-ups) the conclusion costs beyond the final validation."""
        per = train_loader.batch_size or getattr(getattr(train_loader, "batch_sampler", None), "batch_size", 1) or 1
        bn = min(len(train_loader), self.bn_batches) * per if has_batchnorm(self.module) else 0
        return bn + n_val, 1 + int(bn > 0)


@torch.no_grad()
def average_into(avg: torch.nn.Module, model: torch.nn.Module, n: int) -> None:
    """avg <- (n avg + model) / (n + 1) for floating parameters and buffers (one foreach lerp per
    device and dtype); integer buffers (num_batches_tracked) are copied, never divided."""
    groups: dict[tuple, tuple[list, list]] = {}
    pairs = zip(list(avg.parameters()) + list(avg.buffers()), list(model.parameters()) + list(model.buffers()))
    for a, m in pairs:
        a, m = a.detach(), m.detach()
        if n == 0 or not a.is_floating_point():
            a.copy_(m)
        else:
            dst, src = groups.setdefault((a.device, a.dtype), ([], []))
            dst.append(a)
            src.append(m.to(a.device, non_blocking=True))
    for dst, src in groups.values():
        torch._foreach_lerp_(dst, src, 1.0 / (n + 1))


def create_averager(model: torch.nn.Module, share: float) -> WeightAverage | None:
    return WeightAverage(model, share) if share > 0 else None


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def recompute_batchnorm(model: torch.nn.Module, loader: Any, device: torch.device, channels_last: bool,
                        pre: Preprocess, max_batches: int, amp: bool = True,
                        amp_dtype: torch.dtype = torch.float16) -> int:
    """Running statistics of every BatchNorm layer from `max_batches` training batches (a cumulative
    average, as torch.optim.swa_utils.update_bn does, but on this package's uint8 batches).
    -> the number of batches used (0: the model has no BatchNorm)."""
    # Frozen stages keep the statistics they trained with; per-bucket statistics (rect) keep their averages
    # over the snapshots: one cumulative count cannot average a dozen buckets' batches.
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
              and not getattr(m, FROZEN_MARK, False) and not getattr(m, BUCKET_NORM_MARK, False)]
    if not layers:
        return 0
    momenta = {m: m.momentum for m in layers}
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    was_training, used = model.training, 0
    model.train()
    hold_frozen_norms(model)
    tiles = loader_tiles(loader)
    with torch.no_grad():
        for x, _, _ in loader:
            if used >= max_batches:
                break
            with autocast(device, amp, amp_dtype):
                model(normalize(fold_tiles(x.to(device, non_blocking=True), tiles)[0], channels_last, pre))
            used += 1
    for m, momentum in momenta.items():
        m.momentum = momentum
    model.train(was_training)
    return used


def conclude_average(avg: WeightAverage, train_loader: Any, val: Any, device: torch.device, opts: Any,
                     best_score: float, last_score: float | None) -> dict | None:
    """BatchNorm pass, validation, verdict. -> {"score", "threshold", "probs", "use"}: `use` when the
    average should predict (probs None: no validation set, so it predicts unvalidated, as SWA is
    meant to); None when there was nothing to average."""
    if avg.n < 2:
        log.info("weight average: %d snapshot(s) in the last %.0f%% of the schedule, nothing to average",
                 avg.n, 100 * avg.share)
        return None
    batches = recompute_batchnorm(avg.module, train_loader, device, opts.channels_last, opts.preprocess,
                                  avg.bn_batches, opts.amp, opts.amp_dtype)
    if val is None or not len(val.targets):
        log.info("weight average of %d snapshots (BatchNorm from %d batches); no validation set: it predicts",
                 avg.n, batches)
        return {"score": None, "threshold": None, "probs": None, "use": True}
    out = predict(avg.module, val.loader, device, val.task, amp=opts.amp, channels_last=opts.channels_last,
                  desc="validate average", pre=opts.preprocess, amp_dtype=opts.amp_dtype)
    va = score_validation(val.task, val.targets, out["probs"], opts.threshold, opts.beta, opts.min_labels,
                          opts.max_labels)
    bar = max(s for s in (best_score, last_score) if s is not None)
    use = va["score"] >= bar
    log.info("weight average of %d snapshots (BatchNorm from %d batches): val %s %.4f; last weights %s, best "
             "epoch %.4f -> %s", avg.n, batches, va["metric"], va["score"],
             "n/a" if last_score is None else f"{last_score:.4f}", best_score,
             "the average predicts" if use else "kept the trained weights")
    return {"score": va["score"], "threshold": va["threshold"], "probs": out["probs"].astype(np.float32), "use": use}
''',
'kernelkit.engine.trainer': r'''"""The training loop under a wall-clock budget.

One `Trainer` holds everything a step changes (model, optimizer, scaler, EMA, the progress in
`FitState`); `fit` returns its result in memory (`FitResult`: history, the best epoch's
validation probabilities, the state). Checkpoints go through a `checkpoint.Checkpointer`, which
owns the file names; what goes in them is `TrainState`'s; the loop only says when.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import numpy as np
import torch

from ..core.accel import StepGuard
from ..core.clock import now as clock_now
from ..core.distributed import SINGLE, DistInfo, agree, main_done, sum_over_ranks, unwrap
from ..core.progress import progress
from ..core.stopping import StopFlag
from ..data.loaders import DeviceFeeder, loader_tiles, set_epoch
from ..data.transforms import IMAGENET, Preprocess, fold_tiles, normalize, pool_tiles
from ..decide.rules import keeps_up, score_validation
from ..model.factory import hold_frozen_norms, merge_bucket_norms, set_trainable
from .budget import BudgetClock, InferenceReserve, Progress, fmt_seconds, lr_factor
from .checkpoint import BEST, LAST, Checkpointer, rng_state, set_rng_state
from .evaluate import OutOfMemory, autocast, predict
from .learning_check import CHECK_AT, at_prior, stuck_message
from .resolution import ResolutionSchedule, fixed_input_size, resize_batch
from .swa import conclude_average

log = logging.getLogger("kernelkit")

LOG_EVERY = 25  # steps between progress-bar loss updates (each one waits for the GPU)


@dataclass
class FitOptions:
    lr: float = 1e-3
    warmup: float = 0.05
    schedule: str = "linear"
    epochs: int = 0  # 0: train until the time budget (minus the inference reserve) is spent
    amp: bool = True
    amp_dtype: torch.dtype = torch.float16  # accel.amp_dtype: bf16 on Ampere and later
    channels_last: bool = False
    checkpoint_every_s: float = 1200.0
    threshold: float = -1.0  # multi-label: <0 searches on validation
    min_labels: int = 0
    max_labels: int = 0
    beta: float = 2.0
    clip_grad: float = 0.0  # max gradient norm; 0 = off
    freeze_until: float = 0.0  # progress until which only the head trains (1.0: linear probe)
    unfreeze_blocks: int = 0  # then train the last N backbone blocks (0: all)
    preprocess: Preprocess = IMAGENET  # the input statistics the weights expect
    learn_check_at: float = CHECK_AT  # share of training after which a score at the label prior is flagged
    learn_hint: str = ""  # likely causes, named in that warning
    resolution: ResolutionSchedule | None = None  # progressive resizing over the clock; None: always full size


@dataclass
class TrainParts:
    """What a step updates. batch_aug: (x uint8 on device, y, ok) -> (x float 0-255, y, ok)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    loss_fn: Callable
    ema: Any = None
    batch_aug: Callable | None = None
    swa: Any = None  # swa.WeightAverage: running average of the weights over the end of the schedule
    step_model: Any = None  # the torch.compile'd model the training steps run (accel); None: `model`
    compiled: Any = None  # accel.Compiled: how the compile went (seconds, error), for the summary


@dataclass
class FitState:
    """Where training is; saved in every checkpoint, restored on resume."""
    epoch: int = 0
    step: int = 0
    progress: float = 0.0
    best_score: float = -math.inf  # validation score of best.pt
    peak_score: float = -math.inf  # highest validation score at best_px; best.pt: the latest epoch within noise of it
    threshold: float = 0.5
    best_px: int = 0  # input size best_score was validated at (progressive resizing: only equals compare)
    nonfinite_steps: int = 0
    bad_images: int = 0
    micro_batches: int = 1  # doubled after each out-of-memory error; gradients accumulate over them
    session: int = 1  # which Kaggle session of a schedule split over several (resume.py)
    session_end: float = 1.0  # progress at which this session's slice of the schedule ends


@dataclass
class TrainState:
    """The checkpoint format of a training run, owned in one place: what `state_dict` writes is what
    `load_state_dict` reads back (weights, EMA, weight average, optimizer, scaler, RNG, and where the
    schedule is). File names, atomic background writes, the format version and its migration are
    `checkpoint`'s; the session slice a restore starts is `resume`'s."""
    parts: TrainParts
    fit: FitState
    clock: BudgetClock | None = None  # saving only: the time spent so far goes into the file

    def state_dict(self, epoch_done: bool, weights: dict | None = None, average: bool = True) -> dict[str, Any]:
        """`weights`: saved instead of the model's (and of the EMA, which would otherwise predict);
        `average`: with the running weight average, which only a resume needs (last.pt)."""
        parts, state, clock = self.parts, self.fit, self.clock
        ema = {"ema": parts.ema.module.state_dict()} if parts.ema is not None and weights is None else {}
        swa = {"swa": parts.swa.state_dict()} if parts.swa is not None and average else {}
        return {
            "model": weights or unwrap(parts.model).state_dict(), **ema, **swa,
            "optimizer": parts.optimizer.state_dict(), "scaler": parts.scaler.state_dict(),
            "epoch": state.epoch + int(epoch_done), "step": state.step, "progress": state.progress,
            "best_score": state.best_score, "peak_score": state.peak_score, "threshold": state.threshold,
            "best_px": state.best_px,
            "session": state.session, "session_end": state.session_end,
            "elapsed": clock.elapsed() if clock else 0.0, "run_start": clock.start_time if clock else 0.0,
            "rng": rng_state(),
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        parts, state = self.parts, self.fit
        unwrap(parts.model).load_state_dict(ckpt["model"])
        if parts.ema is not None and "ema" in ckpt:
            parts.ema.module.load_state_dict(ckpt["ema"])
            parts.ema.updates = int(ckpt["step"])  # the decay goes on where it was, not warming up again
        if parts.swa is not None and "swa" in ckpt:
            parts.swa.load_state_dict(ckpt["swa"])
        # The implementation flags stay this machine's: a fused (GPU) optimizer's state resumes on a
        # CPU, and a CPU one's on a GPU, each with the kernel it can run.
        flags = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in parts.optimizer.param_groups]
        try:
            parts.optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:  # other parameter groups, e.g. a checkpoint from before frozen_stages
            log.warning("optimizer state not restored (%s): the weights and the schedule resume, AdamW's "
                        "moments start afresh", e)
        for group, own in zip(parts.optimizer.param_groups, flags):
            group.update(own)
        if ckpt.get("scaler") and parts.scaler.is_enabled():
            parts.scaler.load_state_dict(ckpt["scaler"])
        # else: bf16 <-> fp16 across sessions on different GPUs (an H100, then a T4): the loss scale
        # starts afresh, which GradScaler finds within a few steps.
        set_rng_state(ckpt["rng"])
        state.epoch, state.step, state.progress = int(ckpt["epoch"]), int(ckpt["step"]), float(ckpt["progress"])
        state.best_score, state.threshold = ckpt["best_score"], ckpt["threshold"]
        state.peak_score = float(ckpt.get("peak_score", state.best_score))  # absent before the noise rule
        state.best_px = int(ckpt.get("best_px", 0))  # absent in checkpoints from before progressive validation
        state.session, state.session_end = int(ckpt.get("session", 1)), float(ckpt.get("session_end", 1.0))


@dataclass
class Validation:
    loader: Any
    targets: np.ndarray
    task: str
    prior: float | None = None  # score of the best constant prediction: the bar learning must clear


@dataclass
class FitResult:
    state: FitState
    history: list[dict] = field(default_factory=list)
    stop_reason: str = "budget"  # budget | epochs | signal | finished
    best_val_probs: np.ndarray | None = None
    average: dict | None = None  # the weight average's verdict (swa): snapshots, its score, whether it predicts
    warnings: list[str] = field(default_factory=list)  # loud but not failures (the model is not learning)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class Trainer:
    """Trains `parts` until the budget (minus the measured inference reserve), `opts.epochs`, or a
    stop request. Under DDP (`dist`) rank 0's clock rules and only rank 0 validates and saves."""

    def __init__(self, parts: TrainParts, opts: FitOptions, clock: BudgetClock, reserve: InferenceReserve,
                 device: torch.device, saver: Checkpointer | None = None, dist: DistInfo = SINGLE,
                 stop: StopFlag | None = None, state: FitState | None = None):
        self.parts, self.opts, self.clock, self.reserve = parts, opts, clock, reserve
        self.device, self.saver, self.dist, self.stop = device, saver, dist, stop
        self.state = state or FitState()
        self.core = unwrap(parts.model)
        # The steps run the compiled model when there is one; validation, EMA and checkpoints use
        # the plain module (same weights), so no eval-mode recompile and no '_orig_mod.' keys.
        self.step_model = parts.step_model if parts.step_model is not None else parts.model
        self.total_steps = self.stop_step = 0
        self.schedule = Progress(clock, self.state.progress, end=self.state.session_end)
        self.step_s = 0.0  # smoothed wall time of one step, so the last one does not overrun
        self.frozen = False
        self.last_save = clock_now()
        self.stop_reason = "budget"
        self.learning_checked = False
        self.learning_peak = -math.inf  # the highest validation score at any size: what the learning check reads
        self.train_px = 0  # the input size of the last training step (progressive resizing)
        self.tiles = 1  # squares per image in the current batch (input_mode tiles: the model's max over them)
        self.result = FitResult(self.state)  # filled as training goes: survives a failure mid-way
        self.guard = StepGuard(parts.scaler)
        self.epoch_skipped = 0  # skipped steps of this epoch already counted in state.nonfinite_steps
        if opts.resolution is not None and fixed_input_size(self.core):
            # On by default, so a ViT's run is not flagged for what its user did not ask for: a log line.
            log.warning("progressive resizing off: this model takes only img_size inputs (a patch embedding with "
                        "a fixed size); training runs at img_size throughout")
            self.opts = dataclasses.replace(opts, resolution=None)

    # ------------------------------------------------------------------ schedule and stopping
    def deadline(self) -> float:
        return self.clock.total_s - self.clock.margin_s - self.reserve.seconds()

    def time_is_up(self) -> bool:
        if self.stop is not None and self.stop.requested:
            self.stop_reason = "signal"
            return True
        if self.stop_step and self.state.step >= self.stop_step:
            self.stop_reason = "epochs"
            return True
        return self.clock.elapsed() + self.step_s >= self.deadline()

    def control(self) -> tuple[bool, float]:
        """-> (stop now?, this step's LR); every rank adopts rank 0's answer."""
        stop, self.state.progress = agree(self.dist, self.time_is_up(),
                                          self.schedule.at(self.deadline(), self.state.step))
        if self.opts.freeze_until > 0:
            self.follow_freeze_schedule()
        return stop, self.opts.lr * lr_factor(self.state.progress, self.opts.warmup, self.opts.schedule)

    def follow_freeze_schedule(self) -> None:
        want = self.state.progress < self.opts.freeze_until
        if want != self.frozen:
            blocks = 0 if want else (self.opts.unfreeze_blocks or None)
            n = set_trainable(self.core, blocks)
            log.info("%s: %d trainable parameters", "backbone frozen" if want else
                     f"unfreezing {'all' if blocks is None else f'the last {blocks}'} backbone blocks", n)
            self.frozen = want

    def follow_resolution(self) -> int:
        """This step's input size; each stage change is logged once (the plan on the first step)."""
        px = self.opts.resolution.size_at(self.state.progress)
        if px != self.train_px:
            if not self.train_px:
                log.info("resolution: %s (p=%.2f now)", self.opts.resolution.describe(), self.state.progress)
            else:
                log.info("resolution -> %d px at p=%.2f", px, self.state.progress)
            self.train_px = px
        return px

    # ------------------------------------------------------------------ the loop
    def fit(self, train_loader, val: Validation | None) -> FitResult:
        """Epochs until told to stop; validate and checkpoint at each epoch end."""
        opts, state = self.opts, self.state
        self.total_steps = opts.epochs * len(train_loader) if opts.epochs else 0
        # Fixed epochs split over sessions: this session ends at the epoch its slice ends at.
        stop_epoch = round(state.session_end * opts.epochs)
        self.stop_step = stop_epoch * len(train_loader)
        self.schedule = Progress(self.clock, state.progress, self.total_steps, state.session_end)
        if self.parts.swa is not None:
            self.reserve.extra_images, self.reserve.extra_loaders = self.parts.swa.extra_images(train_loader,
                                                                                                self.reserve.n_val)
        result = self.result
        while not (opts.epochs and state.epoch >= stop_epoch) and not agree(self.dist, self.time_is_up(), 0.0)[0]:
            set_epoch(train_loader, state.epoch)
            tr = self.train_epoch(train_loader)
            if self.dist.enabled:  # every rank ends the epoch at the same step: the collective meets
                merge_bucket_norms(self.core, (self.parts.ema.module,) if self.parts.ema is not None else (),
                                   partial(sum_over_ranks, self.dist))
            if tr["images"]:
                self.reserve.train_ips = tr["images_per_s"]
            if self.dist.is_main:
                result.history.append(self.end_of_epoch(tr, val, result))
                self.save(LAST, epoch_done=not tr["stopped"])
            # rank 0 validated alone: the others wait on a store key, with no collective timeout to outlast
            main_done(self.dist, self.clock.start_time + self.clock.total_s)
            if tr["stopped"] or not tr["images"]:
                break
            state.epoch += 1
        result.stop_reason = "epochs" if opts.epochs and state.epoch >= stop_epoch else self.stop_reason
        if self.dist.is_main and (val is None or not len(val.targets)):
            self.save(BEST, epoch_done=True)  # nothing to select on: the last weights are the best
        if self.dist.is_main and self.parts.swa is not None:
            self.use_average(train_loader, val, result)
        return result

    def use_average(self, train_loader, val: Validation | None, result: FitResult) -> None:
        """The weight average becomes best.pt (what the submission predicts with) when it validates at
        least as well as the last and the best weights; both scores are logged either way."""
        last = result.history[-1].get("val_score") if result.history else None
        if self.stop is not None and self.stop.requested:
            log.info("weight average skipped: the grace after the stop request is for the prediction")
            return
        won = conclude_average(self.parts.swa, train_loader, val, self.device, self.opts, self.state.best_score, last)
        if won is None:
            return
        best = self.state.best_score if math.isfinite(self.state.best_score) else None
        result.average = {"snapshots": self.parts.swa.n, "score": won["score"], "last_score": last,
                          "best_score": best, "predicts": won["use"]}
        if not won["use"]:
            return
        if won["probs"] is not None:
            self.state.best_score, self.state.threshold = won["score"], won["threshold"]
            result.best_val_probs = won["probs"]
        self.save(BEST, epoch_done=True, weights=self.parts.swa.module.state_dict())

    def train_epoch(self, loader, max_steps: int = 0) -> dict:
        """One pass over `loader` (or `max_steps` steps): LR, step, clip, log, checkpoint."""
        parts, opts, state = self.parts, self.opts, self.state
        parts.model.train()
        hold_frozen_norms(parts.model)
        images, stopped, n_losses = 0, False, 0
        self.epoch_skipped = 0
        # Loss, unreadable images and skipped (non-finite) steps are summed on the device and read at the
        # end (and for the bar every LOG_EVERY steps): reading them per step would make the CPU wait for
        # the GPU at every step end, leaving the GPU idle while the next step is prepared.
        loss_sum, unreadable, skipped, good = (torch.zeros((), device=self.device) for _ in range(4))
        recent: deque = deque(maxlen=50)
        t0 = t_prev = clock_now()
        t_first, first_n = None, 0
        bar = progress(DeviceFeeder(loader, self.device), desc=f"epoch {state.epoch}")
        tiles = loader_tiles(loader)
        for x, y, ok in bar:
            stop, lr = self.control()
            if stop or (max_steps and state.step >= max_steps):
                stopped = True
                break
            set_lr(parts.optimizer, lr)
            x, self.tiles = fold_tiles(x, tiles)  # before the batch augmentation: a crop must not straddle two tiles
            if parts.batch_aug is not None:
                x, y, ok = parts.batch_aug(x, y, ok)
            if opts.resolution is not None:
                x = resize_batch(x, self.follow_resolution())
            loss = self.forward_backward(normalize(x, opts.channels_last, opts.preprocess), y, ok)
            bad = self.update(loss)
            loss = torch.where(bad > 0, torch.nan, loss)  # a skipped step's loss is not averaged
            skipped += bad
            good += 1 - bad
            unreadable += (ok == 0).sum()
            images += len(ok)
            loss_sum += loss.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
            recent.append(loss)
            n_losses += 1
            now = clock_now()
            self.step_s = now - t_prev if t_first is None else 0.8 * self.step_s + 0.2 * (now - t_prev)
            t_prev = now
            if t_first is None:
                t_first, first_n = now, images
            if n_losses % LOG_EVERY == 1:  # the loop's only host read: the bar's loss and the skip count
                mean, n_skipped = torch.stack((torch.stack(tuple(recent)).nanmean(), skipped)).tolist()
                self.note_skipped(int(n_skipped))
                bar.set_postfix(loss=f"{mean:.4f}", lr=f"{parts.optimizer.param_groups[0]['lr']:.2e}",
                                p=f"{state.progress:.2f}", refresh=False)
            if self.dist.is_main and now - self.last_save >= opts.checkpoint_every_s:
                self.save(LAST, epoch_done=False)
        bar.close()
        loss_total, n_good, n_unreadable, n_skipped = torch.stack((loss_sum, good, unreadable, skipped)).tolist()
        self.note_skipped(int(n_skipped))
        state.bad_images += int(n_unreadable)
        t_end = clock_now()
        # Throughput after the first step, which carries worker start-up and lazy initialisation.
        steady = (images - first_n, t_end - t_first) if t_first and images > first_n else (images, t_end - t0)
        return {"loss": loss_total / n_good if n_good else float("nan"), "images": images,
                "seconds": t_end - t0, "images_per_s": steady[0] / max(steady[1], 1e-9), "skipped": int(n_unreadable),
                "stopped": stopped, "lr": parts.optimizer.param_groups[0]["lr"]}

    def update(self, loss: torch.Tensor) -> torch.Tensor:
        """Clip, step, then the weight averages. One NaN batch must not poison the weights of a
        9-hour run: a step with non-finite gradients is skipped on the device (the fp16 scaler, or
        StepGuard for bf16/fp32), the same on every rank (the gradients are all-reduced first).
        -> 0-d float on the device: 1 when this step was skipped (fp16: when its loss was not finite)."""
        parts, state = self.parts, self.state
        if self.opts.clip_grad > 0:
            parts.scaler.unscale_(parts.optimizer)  # clip the true gradients, not the loss-scaled ones
            torch.nn.utils.clip_grad_norm_(parts.model.parameters(), self.opts.clip_grad)
        found = self.guard.step(parts.optimizer)
        if parts.ema is not None:
            parts.ema.update(self.core)
        if parts.swa is not None:
            parts.swa.update(self.core, state.progress)
        state.step += 1
        bad = (~torch.isfinite(loss)).float()
        return bad if found is None else torch.maximum(bad, found.to(bad.device).clamp(max=1.0))

    def note_skipped(self, epoch_total: int) -> None:
        """`epoch_total`: steps skipped so far this epoch (read with the loss); new ones are logged."""
        new = epoch_total - self.epoch_skipped
        if new > 0:
            self.epoch_skipped = epoch_total
            self.state.nonfinite_steps += new
            log.warning("non-finite loss or gradients in %d step(s) up to step %d; updates skipped (%d so far)",
                        new, self.state.step, self.state.nonfinite_steps)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """Gradients of the batch loss, in `state.micro_batches` pieces; -> the loss (not read here).

        Out of memory: free what we can, split the batch in twice as many pieces and retry it. The
        pieces are weighted by their share of valid images, so the gradient equals the full batch's
        and the effective batch size (hence the LR that suits it) does not change.
        """
        state = self.state
        while True:
            self.parts.optimizer.zero_grad(set_to_none=True)
            try:
                return self._accumulate(x, y, ok, state.micro_batches)
            except OutOfMemory:
                if self.dist.enabled or state.micro_batches >= len(ok):
                    raise  # ranks would disagree on the number of backward passes
                self.parts.optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                state.micro_batches *= 2
                log.warning("out of memory at batch size %d: continuing with %d micro-batches of ~%d "
                            "(gradient accumulation keeps the effective batch)", len(ok), state.micro_batches,
                            -(-len(ok) // state.micro_batches))

    def _accumulate(self, x: torch.Tensor, y: torch.Tensor, ok: torch.Tensor, pieces: int) -> torch.Tensor:
        total_weight = ok.sum().clamp_min(1.0)
        batch_loss = torch.zeros((), device=self.device)
        per = -(-len(ok) // pieces)  # images per piece; an image's tiles stay in its piece
        for xs, ys, oks in zip(x.split(per * self.tiles), y.split(per), ok.split(per)):
            with autocast(self.device, self.opts.amp, self.opts.amp_dtype):
                logits = pool_tiles(self.step_model(xs), self.tiles)
            loss = self.parts.loss_fn(logits, ys, oks) * (oks.sum().clamp_min(1.0) / total_weight if pieces > 1 else 1.0)
            self.parts.scaler.scale(loss).backward()
            batch_loss += loss.detach()
        return batch_loss

    # ------------------------------------------------------------------ validation and checkpoints
    def end_of_epoch(self, tr: dict, val: Validation | None, result: FitResult) -> dict:
        """Validate, keep best.pt and its validation probabilities; -> the epoch's history row."""
        state, opts = self.state, self.opts
        row = {"epoch": state.epoch, "train_loss": tr["loss"], "train_images": tr["images"],
               "train_s": round(tr["seconds"], 2), "lr_end": tr["lr"], "progress": round(state.progress, 4),
               "elapsed_s": round(self.clock.elapsed(), 1)}
        if self.opts.resolution is not None:
            row["train_px"] = self.train_px  # the size at the epoch's end (stage changes are logged)
        if val is None or not len(val.targets) or not tr["images"] or self.stop_reason == "signal":
            # After SIGTERM the grace is for the test prediction, not for a validation pass.
            log.info("epoch %d  loss %.4f  %s", state.epoch, tr["loss"], self.timing(tr))
            return row
        model = self.core if self.parts.ema is None else self.parts.ema.module
        small, px = self.validation_size()
        out = predict(model, val.loader, self.device, val.task, amp=opts.amp, channels_last=opts.channels_last,
                      desc="validate", pre=opts.preprocess, amp_dtype=opts.amp_dtype, size=small)
        va = score_validation(val.task, val.targets, out["probs"], opts.threshold, opts.beta, opts.min_labels,
                              opts.max_labels)
        if not small:  # the reserve plans the final, full-size validation
            self.reserve.val_ips = out["images_per_s"]
        self.reserve.observe_startup(out["startup_s"])
        row.update(val_score=va["score"], threshold=va["threshold"], val_s=round(out["seconds"], 2))
        if small:
            row["val_px"] = small
        self.learning_peak = max(self.learning_peak, va["score"])
        if px > state.best_px:
            if math.isfinite(state.best_score):
                log.info("validation now at %d px: scores at %d px are not comparable, the best checkpoint "
                         "restarts here", px, state.best_px)
            state.best_score, state.peak_score, state.best_px = -math.inf, -math.inf, px
        kept = keeps_up(va["score"], state.peak_score, len(val.targets))
        state.peak_score = max(state.peak_score, va["score"])
        if kept:
            state.best_score, state.threshold = va["score"], va["threshold"]
            result.best_val_probs = out["probs"].astype(np.float32)
            self.save(BEST, epoch_done=not tr["stopped"])
        peak = f", peak {state.peak_score:.4f}" if state.peak_score > state.best_score else ""
        log.info("epoch %d  loss %.4f  val %s %.4f%s (best %.4f%s)  thr %.2f  %s", state.epoch, tr["loss"],
                 va["metric"], va["score"], f" at {small} px" if small else "", state.best_score, peak,
                 va["threshold"], self.timing(tr))
        self.check_learning(val.prior, va["metric"], result)
        return row

    def validation_size(self) -> tuple[int, int]:
        """-> (size to downscale validation images to, 0 = none; the size validated at, 0 = img_size
        without progressive resizing). During a smaller stage validation runs at the training size:
        at img_size a network trained at half of it scores near chance for a run that learns."""
        sched = self.opts.resolution
        if sched is None:
            return 0, 0
        small = self.train_px if 0 < self.train_px < sched.full else 0
        return small, small or sched.full

    def check_learning(self, prior: float | None, metric: str, result: FitResult) -> None:
        """Once, at the first validation past `learn_check_at` of training: is the highest score (at any
        size) still at the label prior? Then warn loudly (and keep training: the submission still comes)."""
        if self.learning_checked or prior is None or self.state.progress < self.opts.learn_check_at:
            return
        self.learning_checked = True
        if at_prior(self.learning_peak, prior):
            msg = stuck_message(self.learning_peak, prior, self.state.progress, metric, self.opts.learn_hint)
            log.warning("!!! %s", msg)
            result.warnings.append(msg)

    def timing(self, tr: dict) -> str:
        """Schedule position, speed, elapsed/budget and when training will end."""
        train_left = self.deadline() - self.clock.elapsed()
        return (f"p={self.state.progress:.2f}  {tr['images_per_s']:.0f} img/s  [{self.clock.fmt()}, training ends "
                f"in {fmt_seconds(train_left)}, then ~{fmt_seconds(self.reserve.seconds())} inference]")

    def save(self, name: str, epoch_done: bool, weights: dict | None = None) -> None:
        """A failed save (full disk, I/O error) is logged and counted by the checkpointer; training goes on.
        `weights`: saved instead of the model's (and of the EMA, which would otherwise predict)."""
        self.last_save = clock_now()
        if self.saver is None:
            return
        # One line per save, on the budget clock: the cadence can be read back from the log.
        log.info("saving %s at %s (p=%.4f)", name, fmt_seconds(self.clock.elapsed()), self.state.progress)
        payload = TrainState(self.parts, self.state, self.clock).state_dict(epoch_done, weights, average=name == LAST)
        self.saver.save(name, payload)  # returns once snapshotted; failures are counted by the checkpointer
''',
'kernelkit.inputs': r'''"""What the competition gives: finding it under /kaggle/input (`discovery`), reading its layout and
labels into a `Competition` (`competition`, over hostile-CSV reading in `csvfiles`), and the
submission's shape: writing it and checking it against sample_submission.csv (`submission`).
Imports only from `core`."""
''',
'kernelkit.inputs.competition': r'''"""Competition formats: read a Kaggle-style input folder (the submission is `submission`'s).

A format turns a folder into a `Competition`: image paths, targets, class names, the test ids in
submission order, and how predictions become submission cells. Everything a bad input can break is
checked here, at load time, so a 9-hour run fails in its first seconds with the file's name instead.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.config import IMAGE_EXTS
from .csvfiles import MISSING, CsvTable, is_missing, read_csv_file, require_rows
from .discovery import TEST_DIRS, TRAIN_DIRS

log = logging.getLogger("kernelkit")

FORMATS = ("multilabel_csv", "single_label_csv", "folder")
# Column names tried in order when no override and no sample submission column name settles it.
ID_NAMES = ("id", "image_id", "imageid", "image", "image_name", "img", "img_id", "filename", "file_name",
            "file", "fname")
LABEL_NAMES = ("label", "labels", "category_id", "category", "class", "class_id", "classes", "target",
               "attribute_ids", "tags", "species", "breed", "landmark_id", "landmarks", "diagnosis")
PRED_NAMES = LABEL_NAMES + ("predicted", "prediction", "predictions")


@dataclass
class Competition:
    format: str
    task: str  # "multilabel" or "multiclass"
    classes: list[str]  # label ids as written in the submission (e.g. "147" or "forest")
    class_names: list[str]  # human readable names (labels.csv) for logs
    train_paths: list[str]
    train_targets: np.ndarray  # multilabel: (N, C) uint8; multiclass: (N,) int64
    test_ids: list[str]
    test_paths: list[str]  # "" where the file is missing: it still gets a (fallback) row
    id_column: str = "id"  # submission's id column
    pred_column: str = "predicted"  # submission's prediction column; "" for a wide sample
    sample_submission: Path | None = None
    missing_train: int = 0
    train_label_column: str = ""  # train.csv column the labels came from ("" for folders)
    submission_columns: list[str] = field(default_factory=list)  # every column, in the sample's order
    submission_sep: str = ","  # the sample's delimiter, reproduced by the writer
    # A wide sample (id + one 0/1 column per class): column -> class index; -1 = a class training never
    # shows (always 0). Empty for the usual id,prediction layout.
    wide_columns: dict[str, int] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class Layout:
    """Where a competition keeps its files and how train.csv names them (options, else detected)."""
    root: Path
    train: Path  # the training images folder (train/, train_images/, ...)
    test: Path
    id_column: str = ""
    label_column: str = ""
    image_ext: str = ""  # only files with this extension are images (".jpg"); "" = any image extension


def _image_folder(root: Path, names: tuple[str, ...], explicit: str, option: str) -> Path:
    if explicit:
        d = root / explicit
        if not d.is_dir():
            raise FileNotFoundError(f"{option}={explicit!r}: {d} is not a folder")
        return d
    present = [n for n in names if (root / n).is_dir()]
    if len(present) > 1:
        raise ValueError(f"{root}: several image folders {present}; set {option}= to the one to use")
    return root / (present[0] if present else names[0])


def make_layout(root: str | Path, train_images: str = "", test_images: str = "", id_column: str = "",
                label_column: str = "", image_ext: str = "") -> Layout:
    root = Path(root)
    return Layout(root, _image_folder(root, TRAIN_DIRS, train_images, "train_images"),
                  _image_folder(root, TEST_DIRS, test_images, "test_images"), id_column, label_column,
                  image_ext.lower())


def _is_junk(name: str) -> bool:
    """Hidden entries (.ipynb_checkpoints, AppleDouble ._x.jpg) and __MACOSX are zip/OS debris, not data."""
    return name.startswith((".", "__"))


class ImageIndex(dict):
    """id (file name, and stem) -> path, from one directory scan instead of a stat per id. A stem
    shared by several files (a.jpg and a.png) is kept out and remembered: an id naming it is refused
    rather than read from whichever file the scan met first."""

    def __init__(self) -> None:
        super().__init__()
        self.ambiguous: dict[str, list[str]] = {}


def _index_images(folder: Path, ext: str = "") -> ImageIndex:
    index = ImageIndex()
    if not folder.is_dir():
        return index
    exts = (ext,) if ext else IMAGE_EXTS
    stems: dict[str, list[str]] = {}
    with os.scandir(folder) as it:
        for e in it:
            if e.is_file() and e.name.lower().endswith(exts) and not _is_junk(e.name):
                index[e.name] = e.path
                stems.setdefault(os.path.splitext(e.name)[0], []).append(e.path)
    for stem, paths in stems.items():
        if len(paths) == 1:
            index.setdefault(stem, paths[0])
        else:
            index.ambiguous[stem] = sorted(os.path.basename(p) for p in paths)
    return index


def _safe_id(value: object, row: int, name: str) -> str:
    s = str(value).strip()
    if not s or s.lower() == "nan":
        raise ValueError(f"{name} row {row + 2}: empty id")
    if "/" in s or "\\" in s or s in (".", "..") or s.startswith(".."):
        # Ids name files inside the data root; a path here could read anything on disk.
        raise ValueError(f"{name} row {row + 2}: id {s!r} looks like a path; refusing to read outside the data root")
    return s


def _check_unique(ids: list[str], name: str) -> None:
    seen: dict[str, int] = {}
    for r, i in enumerate(ids):
        if i in seen:
            raise ValueError(f"{name}: id {i!r} is duplicated (rows {seen[i] + 2} and {r + 2}); "
                             "merge or drop the duplicates")
        seen[i] = r


def _lookup(i: str, index: ImageIndex) -> str:
    p = index.get(i, "")
    stem = os.path.splitext(i)[0] if i.lower().endswith(IMAGE_EXTS) else i
    if not p and stem in index.ambiguous:
        raise ValueError(f"id {i!r} matches several files {index.ambiguous[stem]}; set image_ext= "
                         f"(one of {', '.join(IMAGE_EXTS)}) to say which extension the images have")
    if not p and stem != i:
        # "abc.jpg" in the csv while the file is abc.png: the stem still names it.
        p = index.get(stem, "")
    return p


def _resolve(ids: list[str], index: ImageIndex, what: str) -> tuple[list[str], int]:
    paths = [_lookup(i, index) for i in ids]
    missing = sum(1 for p in paths if not p)
    if missing:
        example = next(i for i, p in zip(ids, paths) if not p)
        log.warning("%d %s ids have no image file (e.g. %r)", missing, what, example)
    return paths, missing


def _match(names: list[str] | tuple[str, ...], columns: list[str]) -> str:
    """The first of `names` among `columns`, compared case-insensitively; "" when none is."""
    low = {c.lower(): c for c in columns}
    return next((low[n.lower()] for n in names if n and n.lower() in low), "")


def _explicit(name: str, table: CsvTable, what: str) -> str:
    if not name:
        return ""
    col = _match([name], table.columns)
    if not col:
        raise ValueError(f"{table.name}: {what}={name!r} is not a column; its columns are {table.columns}")
    return col


def _known_label(table: CsvTable, rest: list[str]) -> str:
    if len(rest) == 1:
        return rest[0]
    hits = [c for c in rest if c.lower() in LABEL_NAMES]
    if len(hits) == 1:
        return hits[0]
    why = f"several label-like columns {hits}" if hits else "no column has a known label name"
    raise ValueError(f"{table.name}: cannot tell which column holds the labels ({why}); its columns are "
                     f"{table.columns}. Set label_column= (and id_column=) to name them")


def pick_columns(table: CsvTable, sample_cols: list[str], id_column: str = "",
                 label_column: str = "") -> tuple[str, str]:
    """(id column, label column) of train.csv: explicit names, else the sample's names, else known names.

    Extra columns (width, height, genus) are common; picking by position would train on the wrong one.
    """
    cols = table.columns
    if len(cols) < 2:
        raise ValueError(f"{table.name}: need two columns (id, label), found {cols}")
    lab = _explicit(label_column, table, "label_column")
    others = [c for c in cols if c != lab]
    id_col = (_explicit(id_column, table, "id_column") or _match(sample_cols[:1], others)
              or _match(ID_NAMES, others) or others[0])
    if id_col == lab:
        raise ValueError(f"{table.name}: id_column and label_column are both {lab!r}")
    rest = [c for c in cols if c != id_col]
    lab = lab or _match(sample_cols[1:2], rest) or _known_label(table, rest)
    return id_col, lab


def _read_sample(root: Path) -> CsvTable | None:
    path = root / "sample_submission.csv"
    if not path.is_file():
        return None
    sample = require_rows(read_csv_file(path))
    if len(sample.columns) < 2:
        raise ValueError(f"{path} has one column {sample.columns}: no column to write predictions into. "
                         "A submission needs the id column and a prediction column (e.g. id,label); "
                         "fix the sample, or remove it to write id + prediction columns")
    return sample


def _test_ids(lay: Layout, sample: CsvTable | None) -> list[str]:
    if sample is not None:
        name = Path(sample.name).name
        ids = [_safe_id(v, r, name) for r, v in enumerate(sample.column(sample.columns[0]))]
        _check_unique(ids, name)
        return ids
    index = _index_images(lay.test, lay.image_ext)
    return sorted({os.path.splitext(os.path.basename(p))[0] for p in index.values()} | set(index.ambiguous))


def _looks_multilabel(cells: list[str]) -> bool:
    """Space-separated words in a label column: several labels per image, or class names with spaces?

    Tags combine freely, so a word of a combined cell is also a label on its own or sits at varying
    places ("clear primary", "haze primary water", "primary"); a word of a class name keeps its place
    ("golden retriever", "labrador retriever"). Numbers ("1 5 9") are always tag ids.
    """
    vals = {c.strip() for c in cells if not is_missing(c)}
    spaced = [v.split() for v in vals if len(v.split()) > 1]
    if not spaced:
        return False
    if all(w.isdigit() for words in spaced for w in words):
        return True
    alone = {v for v in vals if len(v.split()) == 1}
    places: dict[str, set[int]] = {}
    for words in spaced:
        for k, w in enumerate(words):
            places.setdefault(w, set()).add(k)
    reused = {w for w, ks in places.items() if len(ks) > 1 or w in alone}
    return sum(any(w in reused for w in words) for words in spaced) > len(spaced) / 2


def detect_format(root: Path, id_column: str = "", label_column: str = "", train_dir: Path | None = None) -> str:
    root = Path(root)
    train_dir = train_dir or make_layout(root).train
    train_csv = root / "train.csv"
    if train_csv.is_file():
        table = read_csv_file(train_csv)
        if "attribute_ids" in [c.lower() for c in table.columns] or (root / "labels.csv").is_file():
            return "multilabel_csv"
        sample = _read_sample(root)
        _, lab = pick_columns(table, sample.columns if sample else [], id_column, label_column)
        cells = table.column(lab)
        if _looks_multilabel(cells):
            n = sum(1 for c in cells if len(c.split()) > 1)
            log.warning("%s: %d cells of label column %r hold several space-separated labels (e.g. %r); reading "
                        "it as multi-label (format=single_label_csv overrides)", train_csv, n, lab,
                        next(c for c in cells if len(c.split()) > 1))
            return "multilabel_csv"
        return "single_label_csv"
    if _class_dirs(train_dir):
        return "folder"
    raise FileNotFoundError(
        f"{root}: no train.csv and no {train_dir.name}/<class>/ folders; set format= and data_dir= explicitly")


def load_competition(root: str | Path, fmt: str = "auto", id_column: str = "", label_column: str = "",
                     train_images: str = "", test_images: str = "", image_ext: str = "") -> Competition:
    """id_column / label_column name train.csv's columns, train_images / test_images the image
    folders, when detection cannot (or guesses wrong)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir {root} does not exist")
    lay = make_layout(root, train_images, test_images, id_column, label_column, image_ext)
    fmt = detect_format(root, id_column, label_column, lay.train) if fmt == "auto" else fmt
    loader = {"multilabel_csv": _load_multilabel_csv, "single_label_csv": _load_single_label_csv,
              "folder": _load_folder}.get(fmt)
    if loader is None:
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    sample = _read_sample(root)
    comp = loader(lay, sample)
    _fit_submission(comp, sample)
    comp.test_paths, _ = _resolve(comp.test_ids, _index_images(lay.test, lay.image_ext), "test")
    log.info("%s: %d train images, %d classes (%s), %d test ids", fmt, len(comp.train_paths),
             comp.num_classes, comp.task, len(comp.test_ids))
    return comp


def _train_table(lay: Layout, sample: CsvTable | None) -> tuple[list[str], list[str], str]:
    """(ids, raw label cells, label column name) of train.csv, ids checked."""
    table = require_rows(read_csv_file(lay.root / "train.csv"))
    id_col, lab_col = pick_columns(table, sample.columns if sample else [], lay.id_column, lay.label_column)
    ids = [_safe_id(v, r, "train.csv") for r, v in enumerate(table.column(id_col))]
    _check_unique(ids, "train.csv")
    return ids, [v.strip() for v in table.column(lab_col)], lab_col


def _class_key(t: str) -> tuple[bool, int, str]:
    """Numeric labels in numeric order ("2" before "10"), then the rest alphabetically."""
    num = t.lstrip("-").isdigit()
    return (not num, int(t) if num else 0, t)


def _labels_csv(path: Path) -> tuple[list[str], list[str]]:
    ldf = require_rows(read_csv_file(path))
    classes = [v.strip() for v in ldf.column(ldf.columns[0])]
    names = [v.strip() for v in ldf.column(ldf.columns[1])] if len(ldf.columns) > 1 else classes
    _check_unique(classes, path.name)
    return classes, names


def _tags(cells: list[str]) -> list[list[str]]:
    """Space-separated tags per cell; "nan"/"None"/"null" mean no tag, like a blank cell does."""
    out = [[t for t in c.split() if t.lower() not in MISSING] for c in cells]
    n = sum(1 for c, tags in zip(cells, out) if len(c.split()) != len(tags))
    if n:
        log.warning("train.csv: %d label cells hold NaN/None/null text; read as no label there", n)
    return out


def _load_multilabel_csv(lay: Layout, sample: CsvTable | None = None) -> Competition:
    """iMet 2019 layout: train.csv (id, attribute_ids), labels.csv (attribute_id, attribute_name)."""
    ids, cells, lab_col = _train_table(lay, sample)
    tags = _tags(cells)  # blank cell = an image with no labels (legitimate in iMet)
    labels_csv = lay.root / "labels.csv"
    if labels_csv.is_file():
        classes, names = _labels_csv(labels_csv)
    else:
        classes = sorted({t for row in tags for t in row}, key=_class_key)
        names = classes
    pos = {c: i for i, c in enumerate(classes)}
    targets = np.zeros((len(ids), len(classes)), dtype=np.uint8)
    for r, row in enumerate(tags):
        for tag in row:
            if tag not in pos:
                raise ValueError(f"train.csv row {r + 2}: label {tag!r} is not in labels.csv")
            targets[r, pos[tag]] = 1
    paths, missing = _resolve(ids, _index_images(lay.train, lay.image_ext), "train")
    keep = np.array([bool(p) for p in paths], dtype=bool)
    return Competition(
        format="multilabel_csv", task="multilabel", classes=classes, class_names=names,
        train_paths=[p for p in paths if p], train_targets=targets[keep], test_ids=_test_ids(lay, sample),
        test_paths=[], id_column="id", pred_column="attribute_ids", missing_train=missing,
        train_label_column=lab_col)


def _drop_missing_labels(raw: list[str], col: str) -> list[int]:
    """Rows to keep: a missing label is no class, and training on a class named "nan" is worse than less data."""
    missing = [r for r, v in enumerate(raw) if is_missing(v)]
    if missing and len(missing) == len(raw):
        more = f", and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ValueError(f"train.csv: no row has a label in column {col!r} (row {missing[0] + 2}: empty label"
                         f"{more}); set label_column= if the labels are in another column")
    if missing:
        log.warning("train.csv: %d rows have no label in column %r (empty or NaN/None/null; rows %s); "
                    "training without them", len(missing), col, ", ".join(str(r + 2) for r in missing[:5])
                    + (", ..." if len(missing) > 5 else ""))
    drop = set(missing)
    return [r for r in range(len(raw)) if r not in drop]


def _load_single_label_csv(lay: Layout, sample: CsvTable | None = None) -> Competition:
    """train.csv with (id, label); the submission has one class per id (iNaturalist's id,predicted)."""
    ids, raw, lab_col = _train_table(lay, sample)
    rows = _drop_missing_labels(raw, lab_col)
    ids, raw = [ids[r] for r in rows], [raw[r] for r in rows]
    classes = sorted(set(raw), key=_class_key)
    pos = {c: i for i, c in enumerate(classes)}
    targets = np.array([pos[v] for v in raw], dtype=np.int64)
    paths, missing = _resolve(ids, _index_images(lay.train, lay.image_ext), "train")
    keep = np.array([bool(p) for p in paths], dtype=bool)
    return Competition(
        format="single_label_csv", task="multiclass", classes=classes, class_names=classes,
        train_paths=[p for p in paths if p], train_targets=targets[keep], test_ids=_test_ids(lay, sample),
        test_paths=[], id_column="id", pred_column="predicted", missing_train=missing,
        train_label_column=lab_col)


def _class_dirs(train: Path) -> list[Path]:
    if not train.is_dir():
        return []
    return sorted(p for p in train.iterdir() if p.is_dir() and not _is_junk(p.name))


def _load_folder(lay: Layout, sample: CsvTable | None = None) -> Competition:
    """train/<class>/*.jpg (Scene-15, Keras flow_from_directory); test/*.jpg."""
    if not lay.train.is_dir():
        raise FileNotFoundError(f"format=folder: {lay.train} is not a folder")
    junk = sorted(p.name for p in lay.train.iterdir() if p.is_dir() and _is_junk(p.name))
    if junk:
        log.info("%s/: skipping %s (not class folders)", lay.train.name, junk)
    classes, paths, targets, empty = [], [], [], []
    for d in _class_dirs(lay.train):
        files = sorted(set(_index_images(d, lay.image_ext).values()))
        if not files:  # an empty folder would be a class the model can never learn
            empty.append(d.name)
            continue
        paths += files
        targets += [len(classes)] * len(files)
        classes.append(d.name)
    if empty:
        log.warning("train/: skipping %d class folders with no images: %s", len(empty), empty[:10])
    if not classes:
        raise ValueError(f"{lay.train}: no class folder holds an image ({', '.join(IMAGE_EXTS)})")
    return Competition(
        format="folder", task="multiclass", classes=classes, class_names=classes,
        train_paths=paths, train_targets=np.array(targets, dtype=np.int64), test_ids=_test_ids(lay, sample),
        test_paths=[], id_column="id", pred_column="label")


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def _wide_columns(comp: Competition, sample: CsvTable) -> dict[str, int]:
    """A sample with a column per class (id,cat,dog,...) wants 0/1 per class, not one prediction column."""
    rest = sample.columns[1:]
    lookups = ({c: i for i, c in enumerate(comp.classes)}, {c: i for i, c in enumerate(comp.class_names)})
    lookup = max(lookups, key=lambda m: sum(c in m for c in rest))
    if sum(c in lookup for c in rest) < 2:
        return {}
    wide: dict[str, int] = {}
    for c in rest:
        if c in lookup:
            wide[c] = lookup[c]
        elif all(_is_number(v) for v in sample.column(c)):
            wide[c] = -1  # a tag the training data never shows: always 0
    unseen = [c for c, k in wide.items() if k < 0]
    uncovered = len(comp.classes) - len({k for k in wide.values() if k >= 0})
    log.info("%s is wide: one 0/1 column per class (%d columns; %d never seen in training, written as 0)",
             sample.name, len(wide), len(unseen))
    if uncovered:
        log.warning("%s has no column for %d of the %d training classes; their predictions are dropped",
                    sample.name, uncovered, len(comp.classes))
    return wide


def _fit_submission(comp: Competition, sample: CsvTable | None) -> None:
    """Take the submission layout (columns, order, delimiter) from the sample, which Kaggle scores against."""
    if sample is None:
        comp.submission_columns = [comp.id_column, comp.pred_column]
        return
    cols = sample.columns
    comp.sample_submission = Path(sample.name)
    comp.submission_sep, comp.submission_columns, comp.id_column = sample.sep, cols, cols[0]
    comp.wide_columns = _wide_columns(comp, sample)
    if comp.wide_columns:
        comp.pred_column = ""
        return
    rest = cols[1:]
    pred = _match([comp.train_label_column], rest) or _match(PRED_NAMES, rest)
    if not pred and len(rest) > 1:
        raise ValueError(f"{sample.name}: cannot tell which of the columns {rest} takes the predictions "
                         f"(none is named like {PRED_NAMES[:4]}... or train.csv's label column)")
    comp.pred_column = pred or rest[0]
    extras = [c for c in rest if c != comp.pred_column]
    if extras:
        log.info("%s: predictions go in column %r; copying %s from the sample as they are", sample.name,
                 comp.pred_column, extras)
''',
'kernelkit.inputs.csvfiles': r'''"""Read the small CSVs a competition ships (train.csv, labels.csv, sample_submission.csv).

Files saved by Excel or by hand come as latin-1, UTF-16 or UTF-8 with a byte-order mark, and with
`;` or tab between the fields. Each of those, read as plain UTF-8 commas, fails late or silently (one
merged column, garbled classes); here it is read correctly, or refused at once with the file's name.
"""
from __future__ import annotations

import codecs
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

log = logging.getLogger("kernelkit")

# UTF-32 before UTF-16: the UTF-32 little-endian mark begins with the UTF-16 one.
BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
        (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
DELIMITERS = (",", ";", "\t", "|")  # on a tie the earlier one wins: a comma file is the common case
# Cell texts that mean "no value": pandas and spreadsheets write these for a missing label.
MISSING = frozenset({"", "nan", "none", "null"})


@dataclass
class CsvTable:
    name: str  # the file's path (or a name for in-memory text), for messages
    frame: pd.DataFrame  # every cell a str, "" where empty
    sep: str
    encoding: str

    @property
    def columns(self) -> list[str]:
        return list(self.frame.columns)

    def column(self, name: str) -> list[str]:
        return [str(v) for v in self.frame[name]]


def is_missing(cell: str) -> bool:
    return cell.strip().lower() in MISSING


def _guess_utf16(head: bytes) -> str:
    """UTF-16 without a byte-order mark: ASCII text has a NUL in every other byte."""
    even, odd = head[0::2], head[1::2]
    if not even or not odd:
        return ""
    if odd.count(0) > 0.4 * len(odd) and even.count(0) < 0.05 * len(even):
        return "utf-16-le"
    if even.count(0) > 0.4 * len(even) and odd.count(0) < 0.05 * len(odd):
        return "utf-16-be"
    return ""


def decode_bytes(data: bytes, name: str) -> tuple[str, str]:
    """(text, encoding): a byte-order mark decides, else UTF-8, else latin-1 with a warning."""
    for bom, enc in BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom):].decode(enc), enc
            except UnicodeDecodeError as e:
                raise ValueError(f"{name}: starts with a {enc} byte-order mark but is not valid {enc} "
                                 f"({e.reason} at byte {e.start}); re-save it as UTF-8") from None
    if b"\x00" in data[:4096]:
        enc = _guess_utf16(data[:4096])
        try:
            if enc:
                return data.decode(enc), enc
        except UnicodeDecodeError:
            pass
        raise ValueError(f"{name}: contains NUL bytes, so it is not a text CSV (a spreadsheet or an "
                         "archive saved under a .csv name?); export it as a UTF-8 CSV")
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as e:
        # latin-1 maps every byte to one character, so it never fails and never loses a byte.
        log.warning("%s is not UTF-8 (byte %d: %r); reading it as latin-1: check that non-ASCII labels "
                    "and ids look right", name, e.start, data[e.start:e.start + 1])
        return data.decode("latin-1"), "latin-1"


def _count_outside_quotes(line: str, sep: str) -> int:
    n, quoted = 0, False
    for ch in line:
        if ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            n += 1
    return n


def sniff_delimiter(text: str) -> str:
    """The delimiter from the header line alone: label cells ("1 5 9", "a;b") must not vote."""
    header = next((ln for ln in text.splitlines() if ln.strip()), "")
    counts = {d: _count_outside_quotes(header, d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


def parse_csv_text(text: str, name: str, encoding: str = "utf-8") -> CsvTable:
    """Every cell as text (ids keep leading zeros, "NA" stays "NA"); column names stripped."""
    if not text.strip():
        raise ValueError(f"{name} is empty: no header and no rows")
    sep = sniff_delimiter(text)
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        msg = " ".join(str(e).split())
        raise ValueError(f"{name}: not a readable CSV with delimiter {sep!r}: {msg}") from None
    df.columns = [str(c).strip() for c in df.columns]
    return CsvTable(name, df.fillna(""), sep, encoding)


def read_csv_file(path: Path) -> CsvTable:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror})") from None
    if not data.strip():
        raise ValueError(f"{path} is empty ({len(data)} bytes): no header and no rows")
    text, enc = decode_bytes(data, str(path))
    return parse_csv_text(text, str(path), enc)


def require_rows(table: CsvTable) -> CsvTable:
    if len(table.frame) == 0:
        raise ValueError(f"{table.name} has no rows (only the header {table.columns})")
    return table
''',
'kernelkit.inputs.discovery': r'''"""Which attached folder under /kaggle/input is the competition.

Kaggle mounts a competition at /kaggle/input/<slug> (older images) or
/kaggle/input/competitions/<slug> (newer ones, sometimes with the data one folder deeper), and
datasets at /kaggle/input/<slug> or /kaggle/input/datasets/<owner>/<slug>. Users also attach
pre-resized copies of the training images and earlier kernel outputs, which look like training
data too. Picking the first folder with a train/ in it silently trains on the wrong thing, and
finding nothing used to run the demo on Kaggle and submit it. So: every candidate is ranked and
logged, a tie at the top is refused, and on Kaggle nothing found is a refusal, never the demo.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..core.config import ConfigError

log = logging.getLogger("kernelkit")

TRAIN_DIRS = ("train", "train_images", "train_imgs", "images_train", "train-images")
TEST_DIRS = ("test", "test_images", "test_imgs", "images_test", "test-images")
SAMPLE = "sample_submission.csv"
MAX_DEPTH = 4  # /kaggle/input/datasets/<owner>/<slug>/<subdir>
MAX_ENTRIES = 200  # a folder with more entries is data (images), not a folder of datasets
# Our own generated demo, inside an attached earlier output: never a competition.
SKIP_NAMES = ("demo_data",)


@dataclass(frozen=True)
class Candidate:
    path: Path
    under_competitions: bool
    has_sample: bool
    has_test: bool
    has_train_csv: bool

    @property
    def rank(self) -> tuple[bool, bool, bool, bool]:
        return (self.under_competitions, self.has_sample, self.has_test, self.has_train_csv)

    def describe(self) -> str:
        marks = [m for m, on in (("competitions/", self.under_competitions), (SAMPLE, self.has_sample),
                                 ("test images", self.has_test), ("train.csv", self.has_train_csv)) if on]
        return f"{self.path} ({', '.join(marks) or 'train images only'})"


def _has_any_dir(d: Path, names: tuple[str, ...]) -> bool:
    return any((d / n).is_dir() for n in names)


def has_training_data(d: Path) -> bool:
    return (d / "train.csv").is_file() or _has_any_dir(d, TRAIN_DIRS)


def _subdirs(d: Path) -> list[Path]:
    """Sub-folders worth descending into; none when `d` holds many entries (an image folder)."""
    out = []
    try:
        with os.scandir(d) as it:
            for k, e in enumerate(it):
                if k >= MAX_ENTRIES:
                    return []
                if e.is_dir() and not e.name.startswith((".", "__")) and e.name not in SKIP_NAMES:
                    out.append(Path(e.path))
    except OSError:
        return []
    return sorted(out)


def scan(input_root: Path) -> tuple[list[Candidate], list[Path]]:
    """(candidates with test data or a sample submission, folders with training data only)."""
    found, train_only = [], []
    level = [input_root]
    for depth in range(1, MAX_DEPTH + 1):
        nxt = []
        for parent in level:
            for d in _subdirs(parent):
                if not has_training_data(d):
                    nxt.append(d)
                    continue
                has_sample, has_test = (d / SAMPLE).is_file(), _has_any_dir(d, TEST_DIRS)
                if not (has_sample or has_test):
                    train_only.append(d)
                    continue
                rel = d.relative_to(input_root).parts
                found.append(Candidate(d, rel[0] == "competitions", has_sample, has_test, (d / "train.csv").is_file()))
        level = nxt
    return found, train_only


def listing(input_root: Path, depth: int = 2) -> str:
    """What is attached, two levels deep, for the refusal message."""
    lines = []
    level = [input_root]
    for _ in range(depth):
        level = [d for parent in level for d in _subdirs(parent)]
        lines += [str(d) for d in level]
    return ", ".join(sorted(lines)[:30]) or "nothing"


def find_competition(input_root: Path, on_kaggle: bool) -> Path | None:
    """The competition folder, or None (not on Kaggle and nothing found: the caller runs the demo).

    Raises ConfigError when the choice is ambiguous, or when on Kaggle nothing matches."""
    if not input_root.is_dir():
        if on_kaggle:
            raise ConfigError(f"{input_root} does not exist: attach the competition (Add Input) or set data_dir=")
        return None
    found, train_only = scan(input_root)
    for d in train_only:
        log.info("input %s: training images but no test images and no %s; not a competition", d, SAMPLE)
    for c in found:
        log.info("input candidate: %s", c.describe())
    if not found:
        if on_kaggle:
            raise ConfigError(f"no competition found under {input_root} (a folder with train.csv or train/ and "
                              f"test/ or {SAMPLE}); attached: {listing(input_root)}. Attach the competition or "
                              "set data_dir= (the generated demo never runs on Kaggle)")
        return None
    best = max(c.rank for c in found)
    top = [c for c in found if c.rank == best]
    if len(top) > 1:
        raise ConfigError("several attached folders look like the competition: "
                          + "; ".join(c.describe() for c in top) + ". Set data_dir= to the one to train on")
    log.info("competition: %s", top[0].path)
    return top[0].path
''',
'kernelkit.inputs.submission': r'''"""The submission: predictions -> cells (`format_predictions`), written in the sample's layout
(columns in its order, its delimiter, extra columns copied, one 0/1 column per class for a wide
sample) and validated in memory before it replaces the file (`write_submission`); the same checks
on a file (`validate_submission`) and, before training, on a dummy submission
(`check_submission_writable`), so a sample the writer cannot reproduce costs seconds, not the run.
The layout itself is read from the sample with the competition (`competition._fit_submission`)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.fileio import atomic_write
from .competition import Competition
from .csvfiles import CsvTable, parse_csv_text, read_csv_file


def format_predictions(comp: Competition, decoded: list[list[int]] | np.ndarray) -> list[str]:
    """Class indices per image -> submission cells (space-separated ids, or one class)."""
    if comp.task == "multilabel":
        return [" ".join(comp.classes[k] for k in row) for row in decoded]
    return [comp.classes[int(k)] for k in decoded]


def cells_to_onehot(comp: Competition, cells: list[str]) -> np.ndarray:
    """Submission cells -> (N, C) 0/1 over comp.classes; a cell naming no class raises ValueError."""
    pos = {c: i for i, c in enumerate(comp.classes)}
    out = np.zeros((len(cells), len(comp.classes)), dtype=np.uint8)
    for r, cell in enumerate(cells):
        tags = cell.split() if comp.task == "multilabel" else [cell.strip()] if cell.strip() else []
        for t in tags:
            if t not in pos:
                raise ValueError(f"prediction {r + 1}: {t!r} is not a class")
            out[r, pos[t]] = 1
    return out


def _sample_table(comp: Competition) -> CsvTable | None:
    return read_csv_file(comp.sample_submission) if comp.sample_submission is not None else None


def render_submission(comp: Competition, cells: list[str], sample: CsvTable | None = None) -> pd.DataFrame:
    """The submission as a frame: the sample's columns in its order, extra columns copied from it."""
    if len(cells) != len(comp.test_ids):
        raise ValueError(f"{len(cells)} predictions for {len(comp.test_ids)} test ids")
    sample = sample if sample is not None else _sample_table(comp)
    cols = comp.submission_columns or [comp.id_column, comp.pred_column]
    onehot = cells_to_onehot(comp, cells) if comp.wide_columns else None
    data: dict[str, object] = {}
    for c in cols:
        if c == comp.id_column:
            data[c] = list(comp.test_ids)
        elif c in comp.wide_columns:
            k = comp.wide_columns[c]  # integer columns: to_csv writes 0/1 without a str per cell
            data[c] = onehot[:, k] if k >= 0 else np.zeros(len(cells), dtype=np.uint8)
        elif c == comp.pred_column:
            data[c] = list(cells)
        elif sample is not None and len(sample.frame) == len(cells):
            data[c] = sample.column(c)  # e.g. Usage: Kaggle wants it back unchanged
        else:
            raise ValueError(f"column {c!r}: nothing to fill it with ({comp.sample_submission} changed?)")
    return pd.DataFrame(data, columns=cols)


def _to_text(comp: Competition, df: pd.DataFrame) -> str:
    return df.to_csv(index=False, sep=comp.submission_sep, lineterminator="\n")


def _check_cells(sub: CsvTable, comp: Competition) -> None:
    if comp.wide_columns:
        for c in comp.wide_columns:
            bad = next((r for r, v in enumerate(sub.column(c)) if v.strip() not in ("0", "1")), None)
            if bad is not None:
                raise ValueError(f"{sub.name} row {bad + 2}, column {c!r}: {sub.column(c)[bad]!r} is not 0 or 1")
        return
    known = set(comp.classes)
    for r, v in enumerate(sub.column(comp.pred_column)):
        tags = v.split() if comp.task == "multilabel" else [v.strip()]
        if comp.task == "multiclass" and not tags[0]:
            raise ValueError(f"{sub.name} has empty predictions (row {r + 2})")
        unknown = next((t for t in tags if t not in known), None)
        if unknown is not None:
            raise ValueError(f"{sub.name} row {r + 2}: prediction {unknown!r} is not one of the classes")


def _check_submission(sub: CsvTable, comp: Competition, ref: CsvTable | None = None) -> None:
    """Same ids, order, columns and delimiter as sample_submission.csv; a valid cell in every row."""
    ref = ref if ref is not None else _sample_table(comp)
    cols = ref.columns if ref is not None else (comp.submission_columns or [comp.id_column, comp.pred_column])
    where = Path(ref.name).name if ref is not None else "expected"
    if ref is not None and sub.sep != ref.sep:
        raise ValueError(f"{sub.name}: delimiter {sub.sep!r}, but {where} uses {ref.sep!r}")
    if sub.columns != cols:
        raise ValueError(f"{sub.name}: columns {sub.columns} != {where} {cols}")
    ids = [v.strip() for v in sub.column(cols[0])]
    want = [v.strip() for v in ref.column(cols[0])] if ref is not None else list(comp.test_ids)
    if len(ids) != len(want):
        raise ValueError(f"{sub.name} has {len(ids)} rows, {where} has {len(want)}")
    bad = next((r for r, (a, b) in enumerate(zip(ids, want)) if a != b), None)
    if bad is not None:
        raise ValueError(f"{sub.name} row {bad + 2}: id {ids[bad]!r} != {where}'s {want[bad]!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{sub.name} has duplicated ids")
    _check_cells(sub, comp)


def write_submission(comp: Competition, cells: list[str], path: Path) -> pd.DataFrame:
    """Render, validate in memory, then replace `path` atomically: an invalid file never lands there."""
    path = Path(path)
    sample = _sample_table(comp)  # read once for both: it is the reference the render must match
    df = render_submission(comp, cells, sample)
    text = _to_text(comp, df)
    _check_submission(parse_csv_text(text, f"{path.name} (not written)"), comp, sample)
    atomic_write(path, text)
    return df


def validate_submission(path: Path, comp: Competition) -> None:
    """Same ids, same order, same columns as sample_submission.csv, and a cell for every row."""
    _check_submission(read_csv_file(Path(path)), comp)


def check_submission_writable(comp: Competition, out_dir: Path | None = None) -> None:
    """Before training: a dummy prediction per test id goes through the real writer's render and checks.

    A sample the writer cannot reproduce (or an output folder it cannot write to) then costs seconds,
    not the whole run. Raises ValueError naming the sample file and the problem.
    """
    where = str(comp.sample_submission) if comp.sample_submission is not None else "test/ (no sample_submission.csv)"
    if not comp.test_ids:
        raise ValueError(f"{where}: no test ids, so there is nothing to predict")
    if not comp.classes:
        raise ValueError(f"{where}: the training data has no classes to predict")
    dummy = [[] for _ in comp.test_ids] if comp.task == "multilabel" else np.zeros(len(comp.test_ids), np.int64)
    try:
        sample = _sample_table(comp)
        text = _to_text(comp, render_submission(comp, format_predictions(comp, dummy), sample))
        _check_submission(parse_csv_text(text, "submission.csv (dry run)"), comp, sample)
    except ValueError as e:
        raise ValueError(f"{where}: a submission in its layout would be invalid: {e}") from None
    if out_dir is not None:
        try:
            with tempfile.TemporaryFile(dir=out_dir):
                pass
        except OSError as e:
            raise ValueError(f"{out_dir}: cannot write the submission there ({e.strerror})") from None
''',
'kernelkit.model': r'''"""The network: timm models with local weights only (`factory`, `weights`), the optimizer and EMA
built for them, and the losses (`losses`). Imports from `core` and `data` (the model's own
preprocessing statistics)."""
''',
'kernelkit.model.factory': r'''"""timm models by name, optional custom heads and feature concatenation, freezing by blocks.

Pretrained weights only ever come from a local file.
"""
from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn

from ..core import env  # noqa: F401  (sets HF_HUB_OFFLINE before timm is imported)
from ..core.weights import resolve_weights, weights_given
from ..data.images import RECT_ASPECTS, rect_bucket
from ..data.transforms import Preprocess

log = logging.getLogger("kernelkit")

HEADS = ("linear", "mlp")


def create_model(name: str, num_classes: int, pretrained_path: str = "", drop_rate: float = 0.0) -> nn.Module:
    """Build `name` with a fresh `num_classes` head (num_classes=0: pooled features only).

    With `pretrained_path`, timm loads that file through `pretrained_cfg_overlay` and drops the
    classifier when its size differs, so ImageNet weights give a new head for our classes.
    """
    if name not in timm.list_models() and not timm.is_model(name):
        raise ValueError(f"timm has no model {name!r} (timm {timm.__version__})")
    kwargs = dict(num_classes=num_classes, drop_rate=drop_rate)
    if weights_given(pretrained_path):
        if not Path(pretrained_path).exists():
            raise FileNotFoundError(
                f"pretrained_path {pretrained_path} not found; attach the weights as a Kaggle dataset and point to the file")
        src = resolve_weights(pretrained_path)
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=src.overlay(), **kwargs)
        log.info("loaded pretrained weights from %s%s", src.file,
                 f" ({src.architecture}, {src.num_classes} classes)" if src.architecture else "")
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
    return model


def preprocess_of(model: nn.Module) -> Preprocess:
    """The input statistics the model's weights expect (timm's data config: 0.5/0.5 for many ViTs,
    the CLIP mean for CLIP weights, ImageNet's for most CNNs); the first backbone's for a feature-head model."""
    from timm.data import resolve_data_config
    backbone = model.backbones[0] if isinstance(model, FeatureHeadModel) else model
    dc = resolve_data_config({}, model=backbone)
    return Preprocess(tuple(float(v) for v in dc["mean"]), tuple(float(v) for v in dc["std"]),
                      str(dc.get("interpolation", "bilinear")))


class FeatureHeadModel(nn.Module):
    """Pooled features of one or more backbones, concatenated, under one trained head.

    head 'mlp' is the Scene-15 seed's BatchNorm -> Dense(hidden) -> ReLU -> Dropout -> Dense;
    two backbones are the Helsinki seed's ensemble of concatenated transfer features.
    """

    def __init__(self, backbones: list[nn.Module], num_classes: int, head: str = "linear", hidden: int = 256,
                 dropout: float = 0.5):
        super().__init__()
        self.backbones = nn.ModuleList(backbones)
        dim = sum(b.num_features for b in backbones)
        if head == "linear":
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))
        elif head == "mlp":
            self.head = nn.Sequential(nn.BatchNorm1d(dim), nn.Linear(dim, hidden), nn.ReLU(inplace=True),
                                      nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        else:
            raise ValueError(f"unknown head {head!r}; choose from {HEADS}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([b(x) for b in self.backbones], dim=1))


def build_model(name: str, num_classes: int, pretrained_path: str = "", drop_rate: float = 0.0,
                head: str = "linear", head_hidden: int = 256, head_dropout: float = 0.5,
                second_model: str = "", second_pretrained_path: str = "") -> nn.Module:
    """The plain timm model when that is all that is asked, else a FeatureHeadModel."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose from {HEADS}")
    if head == "linear" and not second_model:
        return create_model(name, num_classes, pretrained_path, drop_rate)
    backbones = [create_model(name, 0, pretrained_path)]
    if second_model:
        backbones.append(create_model(second_model, 0, second_pretrained_path))
    return FeatureHeadModel(backbones, num_classes, head, head_hidden, head_dropout)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    if isinstance(model, FeatureHeadModel):
        return list(model.head.parameters())
    return list(model.get_classifier().parameters())


def backbone_blocks(model: nn.Module) -> list[list[nn.Parameter]]:
    """Backbone parameters in timm's coarse groups (stem, stage 1, ..., last stage), input first.

    With several backbones the i-th group from the end of each one is merged, so "the last N
    blocks" means the last N of every backbone.
    """
    from timm.models import group_parameters
    backbones = model.backbones if isinstance(model, FeatureHeadModel) else [model]
    head_ids = {id(p) for p in head_parameters(model)}
    per_backbone = []
    for b in backbones:
        groups = group_parameters(b, b.group_matcher(coarse=True))
        blocks = [[b.get_parameter(n) for n in names] for _, names in sorted(groups.items())]
        per_backbone.append([[p for p in blk if id(p) not in head_ids] for blk in blocks])
    depth = max(len(g) for g in per_backbone)
    merged = []
    for i in range(depth, 0, -1):  # align from the output end
        merged.append([p for g in per_backbone if len(g) >= i for p in g[-i]])
    return [blk for blk in merged if blk]


FROZEN_MARK = "kernelkit_frozen"  # an attribute, so copies of the model (EMA, SWA) keep it


HIGH_RESOLUTION = -1  # freeze_early: the stem and every stage at stride <= 4 (frozen_stages=auto with weights)


def high_resolution_parameters(model: nn.Module, max_stride: int = 4) -> list[nn.Parameter]:
    """Parameters from the input up to the last stage whose output stride is <= `max_stride` (timm's
    feature_info): lite0's stem + 2 stages, a ResNet's stem + layer1 (mmdetection's frozen_stages=1),
    a ConvNeXt's stem + stage 0, nothing for a ViT (stride 16 from its first layer)."""
    info = getattr(model, "feature_info", None)
    try:
        last = [f["module"] for f in info if f["reduction"] <= max_stride][-1] if info else None
    except (TypeError, KeyError, IndexError):
        return []
    named = list(model.named_parameters())
    inside = [i for i, (n, _) in enumerate(named) if n.startswith(f"{last}.")] if last else []
    if not inside or inside[-1] >= len(named) - 1:
        return []
    return [p for _, p in named[:inside[-1] + 1]]


def freeze_early(model: nn.Module, stages: int) -> int:
    """Freeze the stem and the first `stages` backbone stages (HIGH_RESOLUTION: those at stride <= 4)
    for the whole run (the last stage always trains); their BatchNorm layers are marked to keep the
    pretrained statistics (`hold_frozen_norms`). Why: the early stages run at the highest resolution,
    so their backward pass is much of a step's cost (lite0 at 160 px on 2 CPU cores, stem + 2 stages
    frozen, 16k of its 3.4M parameters: 83 against 50 images/s in training), while their features (edges, colours)
    transfer as they are. -> parameters frozen."""
    if stages == HIGH_RESOLUTION:
        frozen = {id(p) for p in high_resolution_parameters(model)}
    elif stages > 0:
        groups = backbone_blocks(model)
        frozen = {id(p) for blk in groups[:min(stages + 1, len(groups) - 1)] for p in blk}
    else:
        return 0
    for p in model.parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
            setattr(p, FROZEN_MARK, True)
    for m in model.modules():
        own = list(m.parameters(recurse=False))
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and own and all(id(p) in frozen for p in own):
            setattr(m, FROZEN_MARK, True)
    return sum(p.numel() for p in model.parameters() if id(p) in frozen)


# input_mode rect: a batch holds one aspect bucket, so in training BatchNorm normalises with that bucket's
# statistics (a batch of crowded square frames unlike a batch of sparse strips), while one running
# average of all buckets served every image at evaluation. Measured on the hard task (lite0, 192 px, a
# rect run's best.pt): statistics recomputed per bucket lifted its square frames from 0.870 to 0.943 F2,
# the 1:5 strips from 0.948 to 0.984. So each BatchNorm layer keeps running statistics per bucket of its
# input's shape, as buffers (checkpoints, EMA and resume carry them), used in training and evaluation alike.
BUCKET_NORM_MARK = "kernelkit_bucket_norms"
BUCKET_COUNTS, BUCKET_MOMENTUM = "kernelkit_bucket_counts", "kernelkit_bn_momentum"


def _slot(bucket: int, what: str) -> str:
    return f"rect_{what}_{'p' if bucket < 0 else ''}{abs(bucket)}"  # (buffer names cannot hold '-')


BUCKETS = range(-(len(RECT_ASPECTS) - 1), len(RECT_ASPECTS))  # images.rect_bucket's values, portrait < 0


def bucket_norms(model: nn.Module) -> nn.Module:
    """Every tracking BatchNorm layer of `model` with running statistics per rect bucket (each starting
    from the layer's own), chosen by the shape of the layer's input. -> model (changed in place)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None:
            for b in BUCKETS:
                m.register_buffer(_slot(b, "mean"), m.running_mean.detach().clone())
                m.register_buffer(_slot(b, "var"), m.running_var.detach().clone())
            m.register_forward_pre_hook(_load_bucket_stats)
            m.register_forward_hook(_keep_bucket_stats)
            setattr(m, BUCKET_NORM_MARK, True)
    return model


def _bucket_of(x: torch.Tensor) -> int:
    return rect_bucket(x.shape[-1], x.shape[-2])  # shapes only: nothing read from the device


@torch.no_grad()
def _load_bucket_stats(m: nn.Module, args: tuple) -> None:
    b = _bucket_of(args[0])
    m.running_mean.copy_(m._buffers[_slot(b, "mean")])
    m.running_var.copy_(m._buffers[_slot(b, "var")])
    if m.training and m.momentum is not None:
        # A bucket sees a few batches an epoch: at the usual 0.1 a rare one would keep a tenth of the
        # weights' ImageNet statistics to the end of a short run (one 300 s run: its 1:3-1:5 strips scored
        # 0.945 F2, 0.98 with one average). Its first batches are averaged (momentum 1/n), then 0.1.
        counts = m.__dict__.setdefault(BUCKET_COUNTS, {})  # per process: a resumed run re-averages its first
        counts[b] = n = counts.get(b, 0) + 1
        base = m.__dict__.setdefault(BUCKET_MOMENTUM, m.momentum)  # (kept if a failed forward left it set)
        m.momentum = max(base, 1.0 / n)


@torch.no_grad()
def _keep_bucket_stats(m: nn.Module, args: tuple, out) -> None:
    if m.training:  # this step updated the running statistics: they are its bucket's
        b = _bucket_of(args[0])
        m._buffers[_slot(b, "mean")].copy_(m.running_mean)
        m._buffers[_slot(b, "var")].copy_(m.running_var)
        m.momentum = m.__dict__.pop(BUCKET_MOMENTUM, m.momentum)


def merge_bucket_norms(model: nn.Module, copies: tuple[nn.Module, ...], sum_over_ranks) -> None:
    """Data-parallel ranks keep per-bucket statistics of their own batches (buffers are not synced each
    step), and a rare bucket's one batch an epoch lands on one rank: every rank takes, per layer and
    bucket, the average over the ranks that trained on it, weighted by their batch counts (a rank that
    never saw the bucket still holds the weights' statistics there, which must not count), in `model`
    and in `copies` (the EMA) alike. `sum_over_ranks(tensor) -> tensor`: the collective; every rank
    calls this at the same point. Device tensors only: nothing is read back to the host."""
    slots = [(b, _slot(b, "mean"), _slot(b, "var")) for b in BUCKETS]
    pieces = []  # (layer, its statistics (buckets, 2, C), this rank's batches per bucket (buckets, 1, 1))
    for name, m in model.named_modules():
        if getattr(m, BUCKET_NORM_MARK, False):
            counts = m.__dict__.get(BUCKET_COUNTS, {})
            for layer in (m, *(other.get_submodule(name) for other in copies)):
                stats = torch.stack([torch.stack([layer._buffers[mean], layer._buffers[var]]) for _, mean, var in slots])
                weight = torch.tensor([float(counts.get(b, 0)) for b, _, _ in slots], device=stats.device)
                pieces.append((layer, stats.float(), weight[:, None, None]))
    if not pieces:
        return
    summed = sum_over_ranks(torch.cat([torch.cat([(s * w).flatten(), w.flatten()]) for _, s, w in pieces]))
    at = 0
    for layer, stats, weight in pieces:
        total = summed[at:at + stats.numel()].view_as(stats)
        at += stats.numel()
        weights = summed[at:at + weight.numel()].view_as(weight)
        at += weight.numel()
        merged = torch.where(weights > 0, total / weights.clamp_min(1e-12), stats)
        for (_, mean, var), (new_mean, new_var) in zip(slots, merged):
            layer._buffers[mean].copy_(new_mean)
            layer._buffers[var].copy_(new_var)


def hold_frozen_norms(model: nn.Module) -> None:
    """After `model.train()`: frozen BatchNorm layers normalise with their stored statistics and do not
    update them (a frozen stage whose statistics drift would feed the later stages inputs they were
    not trained on, and small batches make the drift large)."""
    for m in model.modules():
        if getattr(m, FROZEN_MARK, False):
            m.eval()


def set_trainable(model: nn.Module, blocks: int | None) -> int:
    """Train the head plus the last `blocks` backbone blocks (None: everything, 0: head only,
    i.e. a linear probe); what `freeze_early` froze stays frozen. -> number of trainable parameters."""
    early = {id(p) for p in model.parameters() if getattr(p, FROZEN_MARK, False)}
    for p in model.parameters():
        p.requires_grad_(blocks is None and id(p) not in early)
    if blocks is not None:
        for p in head_parameters(model):
            p.requires_grad_(True)
        for blk in backbone_blocks(model)[len(backbone_blocks(model)) - blocks:] if blocks else []:
            for p in blk:
                p.requires_grad_(id(p) not in early)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def create_optimizer(model: nn.Module, lr: float, weight_decay: float, layer_decay: float = 0.0):
    """AdamW without weight decay on norms and biases; layer_decay < 1 scales each block's LR by
    layer_decay ** (depth from the top), stored as the group's `lr_scale`.

    On a GPU the fused AdamW kernel: one launch for all parameters instead of several per tensor,
    and with a GradScaler it skips an overflowing step on the device, without the host sync (and
    the GPU idle time) that checking found_inf on the CPU costs every step."""
    import timm.optim
    if layer_decay and isinstance(model, FeatureHeadModel):
        raise ValueError("layer_decay needs the plain timm model (head='linear', no second backbone)")
    kwargs = dict(opt="adamw", lr=lr, weight_decay=weight_decay, layer_decay=layer_decay or None)
    params = list(model.parameters())
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        try:
            return timm.optim.create_optimizer_v2(model, fused=True, **kwargs)
        except (TypeError, RuntimeError, ValueError) as e:  # an older torch without fused AdamW
            log.info("fused AdamW unavailable (%s); using the default implementation", e)
    return timm.optim.create_optimizer_v2(model, **kwargs)


def ema_decay(target: float, updates: int) -> float:
    """The decay after `updates` updates: (1 + n) / (10 + n), capped at the target. With a fixed 0.999
    a run of a few hundred steps keeps an average of mostly the random initial weights, and that
    average is what validates and predicts (the helsinki14 preset stayed at the label prior)."""
    return min(target, (1.0 + updates) / (10.0 + updates))


def create_ema(model: nn.Module, decay: float):
    """Exponential moving average of the weights (timm's), decay warmed up by `ema_decay`, or None
    when decay is 0. `updates` counts the updates (restored from the step on resume)."""
    if not decay:
        return None
    from timm.utils import ModelEmaV2
    base = getattr(timm.utils, "ModelEmaV3", ModelEmaV2)

    class WarmupEma(base):  # the base class depends on the timm version (V3 appeared in 1.0)
        def __init__(self, model: nn.Module, target: float):
            super().__init__(model, decay=target)
            self.target, self.updates = target, 0

        @torch.no_grad()
        def update(self, model: nn.Module, *args, **kwargs) -> None:
            # timm's own warmup (V3 only) needs a step argument our loop does not pass
            self.decay = ema_decay(self.target, self.updates)
            super().update(model)
            self.updates += 1

    return WarmupEma(model, decay)
''',
'kernelkit.model.losses': r'''"""Losses that accept a per-sample weight (0 for unreadable images).

Every loss has the signature ``loss(logits, targets, weight) -> scalar``: multi-label losses take
(N, C) 0/1 float targets, multi-class losses (N,) class indices. The result is the weighted mean
over samples, ``sum(w_i * l_i) / max(sum(w_i), 1)``, so a weight-0 image contributes nothing and
an all-unreadable batch gives 0 rather than NaN. ``get_loss(name, task, **params)`` binds the
parameters and checks that the loss fits the task.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

MULTILABEL = "multilabel"
MULTICLASS = "multiclass"


def weighted_mean(per_sample: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over samples with 0/1 weights; the clamp keeps an all-zero batch at 0, not NaN."""
    return (per_sample * weight).sum() / weight.sum().clamp_min(1.0)


def _reduce_labels(per_label: torch.Tensor, reduce: str) -> torch.Tensor:
    """(N, C) -> (N,): 'mean' keeps the scale independent of C; 'sum' is what the seeds wrote."""
    if reduce == "mean":
        return per_label.mean(1)
    if reduce == "sum":
        return per_label.sum(1)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


class ClassWeights:
    """Class weights held on the host and copied to each device once: `get_loss` binds them like
    this, because a per-call upload is a blocking host-to-device copy every training step."""

    def __init__(self, values: Sequence[float] | torch.Tensor):
        self.host = torch.as_tensor(values, dtype=torch.float32).detach().cpu()
        self._on: dict[torch.device, torch.Tensor] = {}

    def on(self, device: torch.device) -> torch.Tensor:
        if device not in self._on:
            self._on[device] = self.host.to(device)
        return self._on[device]


def _class_weights(class_weights, like: torch.Tensor) -> torch.Tensor | None:
    if class_weights is None:
        return None
    if isinstance(class_weights, ClassWeights):
        return class_weights.on(like.device)
    return torch.as_tensor(class_weights, dtype=torch.float32, device=like.device)


def class_balanced_weights(counts: Sequence[float] | torch.Tensor, beta: float = 0.999) -> torch.Tensor:
    """Class-balanced weights of Cui et al. 2019, from the effective number of samples.

    w_c = (1 - beta) / (1 - beta ** n_c), rescaled to sum to C so that the loss keeps its usual
    magnitude (and the learning rate its meaning). beta=0 gives equal weights, beta -> 1 inverse
    frequency. Classes with no samples get the weight of a class with one sample instead of
    infinity: they then only ever appear as negatives.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    n = torch.as_tensor(counts, dtype=torch.float64).clamp_min(1.0)
    effective = (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n)) / (1.0 - beta)
    w = 1.0 / effective
    return (w * len(w) / w.sum()).float()


# ------------------------------------------------------------------------------- multi-label


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
             class_weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy, mean over labels; class_weights (C,) scale each label's column."""
    per_label = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    cw = _class_weights(class_weights, logits)
    if cw is not None:
        per_label = per_label * cw
    return weighted_mean(per_label.mean(1), weight)


def bce_sum_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, eps: float = 0.0,
                 class_weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Sum over labels of per-label BCE (Helsinki seed), optionally on clamped probabilities.

    With eps > 0 the probability is squeezed to s(p) = (1 - 2 eps) p + eps, so it lies in
    [eps, 1 - eps] (the seed used eps=0.005: s = 0.99 p + 0.005) and no label can cost more than
    -log(eps). The logs are taken with logaddexp from logsigmoid, so the gradient stays exact
    where sigmoid itself would round to 0 or 1 in float32.
    """
    x, y = logits.float(), targets.float()
    if eps == 0.0:
        per_label = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    else:
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps must be in [0, 0.5), got {eps}")
        log_eps, log_scale = math.log(eps), math.log1p(-2.0 * eps)
        log_s = torch.logaddexp(torch.full_like(x, log_eps), log_scale + F.logsigmoid(x))
        log_1ms = torch.logaddexp(torch.full_like(x, log_eps), log_scale + F.logsigmoid(-x))
        per_label = -(y * log_s + (1.0 - y) * log_1ms)
    cw = _class_weights(class_weights, logits)
    if cw is not None:
        per_label = per_label * cw
    return weighted_mean(per_label.sum(1), weight)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, gamma: float = 2.0,
               alpha: float | None = None, reduce: str = "mean",
               class_weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017), the iMet seed's loss: -alpha_t (1 - p_t)^gamma log p_t.

    reduce='mean' over labels makes gamma=0 (and alpha=None) exactly `bce_loss`; the seed summed
    over labels (reduce='sum'), which under Adam only rescales the loss. The modulating factor is
    computed as exp(gamma * log(1 - p_t)) so its gradient stays finite for 0 < gamma < 1 where
    1 - p_t rounds to 0.
    """
    x, y = logits.float(), targets.float()
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    if gamma != 0.0:
        # 1 - p_t = y (1 - p) + (1 - y) p, in log space; also right for soft targets.
        log_1m_pt = torch.logaddexp(torch.log(y) + F.logsigmoid(-x), torch.log1p(-y) + F.logsigmoid(x))
        ce = torch.exp(gamma * log_1m_pt) * ce
    if alpha is not None:
        ce = (alpha * y + (1.0 - alpha) * (1.0 - y)) * ce
    cw = _class_weights(class_weights, logits)
    if cw is not None:
        ce = ce * cw
    return weighted_mean(_reduce_labels(ce, reduce), weight)


def asl_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, gamma_pos: float = 0.0,
             gamma_neg: float = 4.0, clip: float = 0.05, reduce: str = "mean") -> torch.Tensor:
    """Asymmetric loss (Ridnik et al. 2021) for many-label data where negatives dominate.

    Positives: -(1 - p)^gamma_pos log p. Negatives use the shifted probability p_m = max(p - clip, 0):
    -p_m^gamma_neg log(1 - p_m), so easy negatives (p < clip) cost nothing and the rest are
    down-weighted more strongly than positives. With gamma_pos = gamma_neg = gamma and clip = 0
    it is `focal_loss(gamma)`; with all three 0 it is `bce_loss`. Defaults are the paper's.
    """
    x, y = logits.float(), targets.float()
    log_p = F.logsigmoid(x)
    if clip > 0:
        # 1 - p_m = min(1 - p + clip, 1) >= clip, so the log is safe without logsigmoid.
        one_m_pm = (torch.sigmoid(-x) + clip).clamp(max=1.0)
        log_1m_pm, pm = torch.log(one_m_pm), 1.0 - one_m_pm
    else:
        log_1m_pm, pm = F.logsigmoid(-x), torch.sigmoid(x)
    pos = log_p if gamma_pos == 0 else torch.exp(gamma_pos * F.logsigmoid(-x)) * log_p
    # clamp: a fractional gamma_neg would give 0 ** (gamma - 1) = inf times the clamp's zero gradient.
    neg = log_1m_pm if gamma_neg == 0 else pm.clamp_min(1e-12).pow(gamma_neg) * log_1m_pm
    per_label = -(y * pos + (1.0 - y) * neg)
    return weighted_mean(_reduce_labels(per_label, reduce), weight)


# ------------------------------------------------------------------------------- multi-class


def ce_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, label_smoothing: float = 0.0,
            class_weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Softmax cross-entropy with optional label smoothing.

    class_weights scale each sample by the weight of its true class (Cui et al.'s class-balanced
    softmax loss); the mean is still over images, not over summed class weights as
    F.cross_entropy(weight=...) would do, so rare-class images really count more.
    """
    soft = targets.is_floating_point() and targets.ndim == 2  # mixup/cutmix give class probabilities
    per_sample = F.cross_entropy(logits.float(), targets.float() if soft else targets.long(), reduction="none",
                                 label_smoothing=label_smoothing)
    cw = _class_weights(class_weights, logits)
    if cw is not None:
        per_sample = per_sample * ((targets.float() * cw).sum(1) if soft else cw[targets.long()])
    return weighted_mean(per_sample, weight)


def complement_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) entropy of the predicted distribution over the non-target classes, divided by log(C-1).

    q_j = p_j / (1 - p_target) for j != target is exactly the softmax of the logits with the
    target's logit removed, so it is computed by masking that logit to -inf (no 1 - p division).
    Normalised to [0, 1]: 1 means the wrong classes are perfectly flat.
    """
    x = logits.float()
    c = x.shape[1]
    if c < 3:
        raise ValueError("complement entropy needs at least 3 classes (2 complement classes)")
    target_mask = F.one_hot(targets.long(), c).bool()
    log_q = torch.log_softmax(x.masked_fill(target_mask, float("-inf")), dim=1)
    # 0 * log 0 := 0 on the target column (q = 0 there, log_q = -inf).
    ent = -(log_q.exp() * log_q.masked_fill(target_mask, 0.0)).sum(1)
    return ent / math.log(c - 1)


def complement_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, coef: float = 1.0,
                    label_smoothing: float = 0.0) -> torch.Tensor:
    """Complement objective (COT, Chen et al. 2019; iNat seed): CE - coef * complement entropy.

    COT alternates a CE step with a step that maximises the complement entropy, "neutralising"
    the wrong classes. Here both go into one loss: minimising it raises the true class's
    likelihood and flattens the rest. The entropy is normalised by log(C-1), so coef=1 puts it on
    a 0..1 scale next to CE whatever the number of classes.
    """
    ce = F.cross_entropy(logits.float(), targets.long(), reduction="none", label_smoothing=label_smoothing)
    return weighted_mean(ce - coef * complement_entropy(logits, targets), weight)


# ------------------------------------------------------------------------------- selection

LOSSES: dict[str, tuple[LossFn, str]] = {
    "bce": (bce_loss, MULTILABEL),
    "bce_sum": (bce_sum_loss, MULTILABEL),
    "focal": (focal_loss, MULTILABEL),
    "asl": (asl_loss, MULTILABEL),
    "ce": (ce_loss, MULTICLASS),
    "complement": (complement_loss, MULTICLASS),
}


def get_loss(name: str, task: str, class_counts: Sequence[float] | None = None, cb_beta: float = 0.999,
             **params) -> LossFn:
    """Loss `name` for `task` ('multilabel' | 'multiclass') with its parameters bound.

    name 'auto' is 'bce' for multi-label and 'ce' for multi-class. `class_counts` (training
    examples per class) turn on class-balanced weights with `cb_beta` (losses taking
    class_weights only). Unknown names, parameters or a loss of the other task raise ValueError
    here, not at the first training step.
    """
    if task not in (MULTILABEL, MULTICLASS):
        raise ValueError(f"unknown task {task!r}; expected {MULTILABEL!r} or {MULTICLASS!r}")
    name = {"auto": "bce" if task == MULTILABEL else "ce"}.get(name, name)
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)} or 'auto'")
    fn, loss_task = LOSSES[name]
    if loss_task != task:
        fits = sorted(n for n, (_, t) in LOSSES.items() if t == task)
        raise ValueError(f"loss {name!r} does not fit a {task} task (it is {loss_task}); use one of {fits}")
    accepted = [p for p in inspect.signature(fn).parameters][3:]
    if class_counts is not None:
        if "class_weights" not in accepted:
            raise ValueError(f"loss {name!r} does not take class-balanced weights")
        if "class_weights" in params:
            raise ValueError("give class_counts or class_weights, not both")
        params["class_weights"] = class_balanced_weights(class_counts, cb_beta)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"loss {name!r} got unknown parameters {unknown}; it accepts {accepted}")
    if params.get("class_weights") is not None:
        params["class_weights"] = ClassWeights(params["class_weights"])
    return functools.partial(fn, **params) if params else fn
''',
}
_PACKAGES = ('kernelkit', 'kernelkit.app', 'kernelkit.build', 'kernelkit.core', 'kernelkit.data', 'kernelkit.decide', 'kernelkit.engine', 'kernelkit.inputs', 'kernelkit.model')  # the names whose source is an __init__.py

import importlib.abc as _abc
import importlib.util as _util
import linecache as _linecache
import os as _os
import sys as _sys

_os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything can import timm


class _BundledPackage(_abc.MetaPathFinder, _abc.Loader):
    """Serves the embedded modules, ahead of anything installed under the same name."""

    def find_spec(self, name, path=None, target=None):
        if name not in _SOURCES:
            return None
        return _util.spec_from_loader(name, self, origin=self._filename(name), is_package=name in _PACKAGES)

    @staticmethod
    def _filename(name):
        rel = name.replace(".", "/") + ("/__init__.py" if name in _PACKAGES else ".py")
        return _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "kernel.py:" + rel)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        filename = self._filename(module.__name__)
        source = _SOURCES[module.__name__]
        # Registered so tracebacks show the bundled source lines.
        _linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        module.__file__ = filename
        exec(compile(source, filename, "exec"), module.__dict__)


if not any(isinstance(f, _BundledPackage) or type(f).__name__ == "_BundledPackage" for f in _sys.meta_path):
    _sys.meta_path.insert(0, _BundledPackage())



def _print_with_source(exc_type, exc, tb):
    """The interpreter's own hook reads source lines from disk, and the bundled modules have no
    files: the traceback module reads them from linecache, where the loader put them."""
    import traceback as _traceback
    _traceback.print_exception(exc_type, exc, tb)


_sys.excepthook = _print_with_source

if __name__ == "__main__":
    from kernelkit.app.cli import main
    _sys.exit(main(CONFIG, started_at=_STARTED_AT))
