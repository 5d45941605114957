"""The one typed config. Defaults < preset < CONFIG block in kernel.py < command line."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .weights import resolve_weights, same_architecture, weights_given


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
    "aug": AUG_LEVELS,
    "gpu_aug": ("auto", "", *AUG_LEVELS[1:]),
    "amp_dtype": ("auto", "bf16", "fp16"),
    "schedule": ("linear", "cosine"),
    "loss": ("auto", "bce", "bce_sum", "focal", "asl", "ce", "complement"),
    "threshold_rule": ("global", "group", "class"),
    "mp_context": ("", "spawn", "forkserver", "fork"),
    "ddp_backend": ("", "nccl", "gloo"),
    "image_ext": ("", *IMAGE_EXTS),
    "input_mode": ("auto", "pad", "tiles"),
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
                                  "the options you leave unset take the fine-tuning recipe (FINETUNE in config.py)")
    drop_rate: float = _f(0.0, "dropout before the classifier")
    head: str = _f("linear", "linear | mlp (BatchNorm, Dense head_hidden, ReLU, Dropout: the Scene-15 head)", choices=CHOICES['head'])
    head_hidden: int = _f(256, "mlp head width")
    head_dropout: float = _f(0.5, "dropout in a custom head")
    model2: str = _f("", "second backbone whose pooled features are concatenated with the first (Helsinki ensemble)")
    pretrained_path2: str = _f("", "local weights of model2")
    freeze: float = _f(0.0, "share of training with the backbone frozen (head only): 1 = linear probe, "
                            "0.3 = two-stage fine-tune")
    unfreeze_blocks: int = _f(0, "after the frozen stage train the last N backbone blocks/stages (0 = all)")
    layer_decay: float = _f(0.0, "layer-wise LR decay, e.g. 0.75 (0 = off)")
    ema: float = _f(0.0, "EMA decay of the weights, e.g. 0.999; the EMA is validated and predicts (0 = off)")
    swa: float = _f(0.0, "average the weights over this last share of the schedule, e.g. 0.25 (SWA; BatchNorm "
                         "recomputed after): it predicts when it validates at least as well (0 = off)")
    # images
    img_size: int = _f(0, "square input size; 0 or 'auto' = the images' median size (never upscaled past it), "
                          "lowered until auto_min_epochs fit")
    auto_min_epochs: int = _f(10, "model/img_size auto: the epochs the chosen pair must fit in the training time")
    pad_aspect: float = _f(2.0, "pad to square when long/short side exceeds this (0 = always resize)")
    pad_fill: int = _f(255, "grey level of the padding (iMet seed pads with white)")
    input_mode: str = _f("auto", "pad: each image resized (or padded, see pad_aspect) to one img_size square | tiles: "
                                 "short side resized to img_size, `tiles` squares along the long side, the network "
                                 "sees each and takes the max over them (long strips keep small objects at scale) | "
                                 "auto: tiles when at least a quarter of the sampled training images are 1:2 or "
                                 "longer, else pad (the log says which and why)", choices=CHOICES['input_mode'])
    tiles: int = _f(0, "input_mode=tiles: squares per image along the long side, 2-6; longer images are shrunk to "
                       "fit them (0 = the 75th percentile of the training images' long/short ratio, rounded, 2-3)")
    aug: str = _f("light", "none | flip | light (flip + random resized crop) | medium (+ colour jitter) | "
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
    threshold: float = _f(-1.0, "multi-label threshold; <0 = search on validation")
    threshold_rule: str = _f("global", "multi-label search: global | group (by 'prefix::' of label names) | class", choices=CHOICES['threshold_rule'])
    min_labels: int = _f(0, "multi-label: always emit at least this many labels per image")
    max_labels: int = _f(0, "multi-label: at most this many labels per image (0 = no cap)")
    # demo
    demo_images: int = _f(1000, "demo: number of generated training images")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def input_tiles(self) -> int:
        """Squares per image the data pipeline makes: 1 (pad mode, or a stored config from before the
        option, whose 'auto' was never resolved) or the resolved tile count."""
        return max(2, self.tiles or 3) if self.input_mode == "tiles" else 1

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config", check_paths: bool = True) -> "Config":
        """A config from user input: unknown keys, wrong types and out-of-range values are refused.
        check_paths=False skips the files that only exist where the kernel runs (build time)."""
        refuse_unknown_keys(d, where)
        cfg = cls(**{k: _normalise(k, v) for k, v in d.items()})
        fill_architecture(cfg)
        validate(cfg, check_paths=check_paths)
        return cfg

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


def _field_types() -> dict[str, str]:
    # `from __future__ import annotations` keeps annotations as strings: "int", "float", "bool", "str".
    return {f.name: str(f.type) for f in fields(Config)}


DURATIONS = ("budget", "margin", "checkpoint_every", "grace")
AUTO_ZERO = ("img_size",)  # int options where 'auto' is accepted for 0


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
    typ = _field_types()[key]
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
    raise ConfigError(f"{key}={value!r}: expected {_TYPE_WORDS[typ]}, got {type(value).__name__}")


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string"}


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
        (c.tiles == 0 or 2 <= c.tiles <= 6, f"tiles={c.tiles}: 0 (auto) or 2..6 squares along the long side"),
        (c.input_mode != "tiles" or not (c.mixup or c.cutmix),
         "input_mode=tiles cannot be combined with mixup/cutmix (each image is several tiles); set one of them off"),
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
        (c.demo_images >= 20, f"demo_images={c.demo_images}: must be >= 20"),
        (c.max_train_images >= 0, f"max_train_images={c.max_train_images}: must be >= 0"),
        (c.mode != "infer" or bool(c.checkpoints), "mode='infer' needs checkpoints= (a file, folder or glob)"),
        (c.mode != "blend" or bool(c.checkpoints),
         "mode='blend' needs checkpoints= (run output folders, comma-separated or a glob)"),
        (not ((c.mixup or c.cutmix) and c.loss == "complement"),
         "mixup/cutmix give soft targets, which loss='complement' does not take"),
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
        budget_seconds(c)
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
    problems = _choice_problems(cfg) + _range_problems(cfg) + _parse_problems(cfg)
    if check_paths:
        problems += _path_problems(cfg)
    if problems:
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems))


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
        return _Typed(_field_types()[key], key in AUTO_ZERO)(text)
    except ValueError:
        raise ConfigError(f"{key}={text!r}: expected {_TYPE_WORDS[_field_types()[key]]}") from None


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
    types = _field_types()
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
    return Config.from_dict(with_weights_defaults(merged, {**block, **cli})), args


# Fine-tuning from weights (pretrained_path set or found), for the options neither the user nor the
# preset set. A pretrained net converges in a few epochs, so autopick wants 4, not 10, and its sizes
# run from a quarter of the weights' input size up to it (autopick.ladder); progressive resizing is
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
            pass  # validate() names the problem
    for key, value in FINETUNE.items():
        out.setdefault(key, value)
    return out


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


def budget_seconds(cfg: Config) -> tuple[float, float]:
    """-> (budget, margin) in seconds; the margin must leave time to work with."""
    total = parse_duration(cfg.budget)
    # Fixed costs (interpreter exit, worker teardown) dominate short runs, a share of the budget long ones.
    margin = min(600.0, 0.02 * total + 2.0) if cfg.margin == "auto" else parse_duration(cfg.margin)
    if total <= 0 or margin >= total:
        raise ValueError(f"budget {cfg.budget!r} must be positive and larger than margin {cfg.margin!r}")
    if cfg.mode == "train" and total - margin < MIN_TRAIN_BUDGET_S:
        raise ValueError(f"budget {cfg.budget!r} (margin {fmt(margin)}) leaves under {MIN_TRAIN_BUDGET_S:.0f} s: "
                         "start-up alone (imports, data index, model) takes seconds; give at least 1m")
    return total, margin


MIN_TRAIN_BUDGET_S = 20.0


def fmt(seconds: float) -> str:
    return f"{seconds:g}s"
