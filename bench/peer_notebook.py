"""The peer: a plain timm fine-tune of attached weights, as a Kaggle notebook would write it.

What most public notebooks do with attached ImageNet weights: square resize to 128 px, horizontal flip,
AdamW lr 1e-3 (weight decay 1e-2), cosine decay, ~7 epochs, a 10% hold-out (multi-label: the global
threshold that maximises F2 on it), flip TTA, on the GPU when there is one (fp32, as the plain notebook has it). It stops at the budget like a kernel must: the cosine runs
over min(7 epochs, the time left after a prediction reserve measured on the hold-out), so it is not
cut mid-schedule. No kernelkit code: it reads the competition folder itself (train.csv, train/, test/,
sample_submission.csv; multi-label when the label column is attribute_ids).

    .venv/bin/python bench/peer_notebook.py --data-dir DIR --weights FOLDER --out-dir OUT --budget 120
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from PIL import Image

SIZE, EPOCHS, LR, WD, BATCH = 128, 7, 1e-3, 1e-2, 32


def find_image(folder: Path, image_id: str) -> Path:
    for ext in (".jpg", ".png", ".jpeg"):
        if (folder / f"{image_id}{ext}").is_file():
            return folder / f"{image_id}{ext}"
    raise FileNotFoundError(folder / image_id)


def load_images(folder: Path, ids: list[str], mean: float, std: float) -> torch.Tensor:
    """Every image squared to SIZE once (the datasets are small), normalised like the weights."""
    arr = np.stack([np.asarray(Image.open(find_image(folder, i)).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
                    for i in ids])
    return (torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255 - mean) / std


def read_competition(root: Path):
    train = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    sub = pd.read_csv(root / "sample_submission.csv", dtype=str, keep_default_na=False)
    id_col, label_col = train.columns[:2]
    multilabel = label_col == "attribute_ids"
    if multilabel:
        tags = [[int(t) for t in cell.split()] for cell in train[label_col]]
        n = max(max(t) for t in tags if t) + 1
        if (root / "labels.csv").is_file():
            n = max(n, len(pd.read_csv(root / "labels.csv")))
        y = np.zeros((len(tags), n), np.float32)
        for i, t in enumerate(tags):
            y[i, t] = 1
        classes = [str(k) for k in range(n)]
    else:
        classes = sorted(set(train[label_col]))
        y = np.array([classes.index(c) for c in train[label_col]])
    return train[id_col].tolist(), y, sub, multilabel, classes


def predict(model: torch.nn.Module, x: torch.Tensor, multilabel: bool) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), 2 * BATCH):
            b = x[i:i + 2 * BATCH]
            logits = (model(b) + model(b.flip(3))) / 2  # flip TTA
            out.append(torch.sigmoid(logits) if multilabel else logits.softmax(1))
    return torch.cat(out).cpu().numpy()


def f2(y: np.ndarray, p: np.ndarray) -> float:
    tp = (y * p).sum(1)
    prec, rec = tp / np.maximum(p.sum(1), 1), tp / np.maximum(y.sum(1), 1)
    return float(np.mean(np.where(tp > 0, 5 * prec * rec / np.maximum(4 * prec + rec, 1e-9), 0)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--weights", required=True, help="timm weights folder (config.json + model.safetensors)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--budget", type=float, default=300, help="seconds, start to submission")
    ap.add_argument("--seed", type=int, default=0, help="initial head weights, batch order and hold-out split")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    t0 = time.time()
    torch.manual_seed(a.seed)
    root, out = Path(a.data_dir), Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids, y, sub, multilabel, classes = read_competition(root)
    cfg = json.loads((Path(a.weights) / "config.json").read_text())
    mean, std = cfg["pretrained_cfg"]["mean"][0], cfg["pretrained_cfg"]["std"][0]
    model = timm.create_model(cfg["architecture"], pretrained=True, num_classes=len(classes),
                              pretrained_cfg_overlay={"file": str(Path(a.weights) / "model.safetensors")}).to(a.device)
    x = load_images(root / "train", ids, mean, std).to(a.device)
    xt = load_images(root / "test", sub.iloc[:, 0].tolist(), mean, std).to(a.device)
    rng = np.random.default_rng(a.seed)
    perm = rng.permutation(len(ids))
    va, tr = perm[:len(ids) // 10], perm[len(ids) // 10:]
    yt = torch.from_numpy(y).to(a.device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    steps_per_epoch = math.ceil(len(tr) / BATCH)
    t_pred = time.time()
    predict(model, xt[:2 * BATCH], multilabel)  # the prediction reserve: val + test at this speed, x1.5
    reserve = 1.5 * (time.time() - t_pred) * (len(xt) + len(va)) / min(len(xt), 2 * BATCH) + 3
    train_until = t0 + a.budget - reserve
    total, step, epochs = EPOCHS * steps_per_epoch, 0, 0
    for epoch in range(EPOCHS):
        model.train()
        order = rng.permutation(tr)
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH]
            b = x[idx]
            flip = torch.rand(len(b), device=b.device) < 0.5
            b[flip] = b[flip].flip(3)
            progress = max(step / total, (time.time() - t0) / max(train_until - t0, 1))
            for g in opt.param_groups:
                g["lr"] = LR * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            logits = model(b)
            loss = (F.binary_cross_entropy_with_logits(logits, yt[idx]) if multilabel
                    else F.cross_entropy(logits, yt[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if time.time() > train_until:
                break
        epochs = epoch + 1
        if time.time() > train_until:
            break
    pv = predict(model, x[va], multilabel)
    if multilabel:
        thr = max(np.arange(0.05, 0.95, 0.05), key=lambda t: f2(y[va], pv >= t))
        val = f2(y[va], pv >= thr)
        pt = predict(model, xt, multilabel) >= thr
        cells = [" ".join(str(k) for k in np.flatnonzero(row)) for row in pt]
    else:
        val = float((pv.argmax(1) == y[va]).mean())
        cells = [classes[k] for k in predict(model, xt, multilabel).argmax(1)]
    pd.DataFrame({sub.columns[0]: sub.iloc[:, 0], sub.columns[1]: cells}).to_csv(out / "submission.csv", index=False)
    summary = {"epochs": epochs, "steps": step, "val_score": val, "wall_s": round(time.time() - t0, 1), "device": a.device}
    (out / "summary.json").write_text(json.dumps(summary))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
