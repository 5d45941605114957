"""Using the accelerator that was found: mixed-precision dtype, cuDNN tuning, optional torch.compile.

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


def tune(device: torch.device, deterministic: bool) -> None:
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic


@dataclass
class Compiled:
    model: torch.nn.Module  # the compiled module, or the eager one after a failure
    seconds: float
    error: str = ""  # why it fell back to eager ('' = compiled)


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
