"""aug auto -> light, or flip for thumbnails, from the training images' sizes (file headers only).

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
