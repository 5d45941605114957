"""model='auto' / img_size=0: the largest (model, input size) of a small ladder that still fits
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

