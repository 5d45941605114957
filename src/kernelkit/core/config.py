"""The one typed config: its schema. Every option with its default, help text and allowed values
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
