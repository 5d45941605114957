"""Is the network learning at all? A validation score still at the label prior (what a constant
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
