"""The one path from a checkpoint (or the model in memory) to a submission, shared by the train job
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
