"""input_mode auto -> pad, rect or tiles, from the training images' aspect ratios (file headers only).

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

