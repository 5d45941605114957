"""How long checkpoint writes hold up training: synchronous (the old save_checkpoint in the loop)
against Checkpointer's background writes, on a GPU.

Trains a timm model (random weights, one fixed random batch on the GPU, AdamW, an EMA copy, bf16
autocast, channels_last) for --steps steps and saves a last.pt-sized payload every --save-every
steps; prints the wall time of the same steps with no saves, with synchronous saves and with
background saves, the caller's blocked time and the background write time. It also checks that a
background checkpoint holds the values of the moment it was taken although training went on.

    python bench/bench_checkpoint.py --models resnet50 convnext_base --out /tmp/ckbench
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from kernelkit.engine.checkpoint import LAST, Checkpointer, load_checkpoint, save_checkpoint  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # on a CPU the numbers show the mechanism, not a GPU's stall


def sync() -> None:
    if DEV == "cuda":
        sync()


def setup(name: str, batch: int, size: int):
    import timm
    model = timm.create_model(name, pretrained=False, num_classes=1000).to(DEV).to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=DEV).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=DEV)
    return model, ema, opt, x, y


def step(model, ema, opt, x, y) -> None:
    with torch.autocast(DEV, torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 0.001)


def payload(model, ema, opt, k: int) -> dict:
    return {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(), "step": k,
            "rng": {"torch": torch.get_rng_state()}}


def run(parts, steps: int, every: int, mode: str, out: Path) -> dict:
    saver = Checkpointer(out, {"config": {}})
    sync()
    t0, saves, sync_s = time.perf_counter(), 0, 0.0
    for k in range(1, steps + 1):
        step(*parts)
        if k % every == 0 and mode != "none":
            saves += 1
            if mode == "sync":
                t = time.perf_counter()
                save_checkpoint({**payload(*parts[:3], k), "config": {}}, out / LAST)
                sync_s += time.perf_counter() - t
            else:
                saver.save(LAST, payload(*parts[:3], k))
    sync()
    wall = time.perf_counter() - t0
    saver.flush()
    return {"mode": mode, "wall_s": round(wall, 3), "saves": saves,
            "blocked_s": round(sync_s if mode == "sync" else saver.blocked_s, 3),
            "write_s": round(sync_s if mode == "sync" else saver.write_s, 3)}


def check_snapshot(parts, out: Path) -> bool:
    """A background checkpoint holds the weights of its moment, not those after the next steps."""
    model = parts[0]
    saver = Checkpointer(out, {})
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    saver.save("check.pt", payload(*parts[:3], 0))
    for _ in range(3):
        step(*parts)  # mutates the weights in place while the copy may still be in flight
    saver.flush()
    got = load_checkpoint(out / "check.pt")["model"]
    return all(torch.equal(got[k], v) for k, v in expected.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["resnet50"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--save-every", type=int, default=15)
    ap.add_argument("--out", default="/tmp/ckbench")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.models:
        parts = setup(name, args.batch, args.size)
        for _ in range(10):
            step(*parts)
        ok = check_snapshot(parts, out)
        run(parts, args.save_every, args.save_every, "async", out)  # first pinned allocations, warm caches
        for mode in ("none", "sync", "async", "none", "sync", "async"):
            r = {"model": name, **run(parts, args.steps, args.save_every, mode, out),
                 "ckpt_mb": round((out / LAST).stat().st_size / 1e6, 1), "snapshot_ok": ok}
            print(json.dumps(r), flush=True)
            results.append(r)
        del parts
    if args.json:
        Path(args.json).write_text(json.dumps({"device": DEV, "results": results}, indent=2))


if __name__ == "__main__":
    main()
