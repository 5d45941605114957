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


def nonfinite_gradients(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """A 0-d float tensor on the gradients' device, 1 when any gradient holds inf or NaN (the check
    GradScaler runs, with scale 1); computed on the device, nothing read. None: no gradients."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    found = None
    for (device, _), grads in groups.items():
        flag = torch.zeros((), device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, flag, torch.ones((), device=device))
        found = flag if found is None else torch.maximum(found, flag.to(found.device, non_blocking=True))
    return found


class StepGuard:
    """Applies an optimizer step only when its gradients are finite, without the host reading a flag.

    fp16: the (enabled) GradScaler does it. bf16 and fp32 have no scaler, and a non-finite gradient
    would reach the weights; here the gradients are checked on the device and the flag is handed to
    an optimizer that skips on the device (fused AdamW: `_step_supports_amp_scaling`, the protocol
    GradScaler uses). Any other optimizer needs the flag on the host: one read per step, only then.
    `step` -> a 0-d float tensor on the device, 1 when the step was skipped (None under fp16, whose
    overflow skips are the scaler's normal business)."""

    def __init__(self, scaler):
        self.scaler = scaler

    def step(self, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        if self.scaler.is_enabled():
            self.scaler.step(optimizer)
            self.scaler.update()
            return None
        found = nonfinite_gradients(optimizer)
        if found is None:
            optimizer.step()
        elif getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.found_inf, optimizer.grad_scale = found, None
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf, optimizer.grad_scale
        elif not found.item():
            optimizer.step()
        return found


def tune(device: torch.device, deterministic: bool) -> None:
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic


TRITON_MIN_CAPABILITY = (7, 0)  # Triton (torch.compile's GPU code generator) needs Volta or later


def compile_unsupported(device: torch.device) -> str:
    """Why torch.compile cannot work on `device` ('' when it can): on a P100 (compute capability 6.0)
    Triton refuses only after the whole trace has been paid for, so it is skipped up front."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return ""
    cap = tuple(torch.cuda.get_device_capability(device))
    if cap < TRITON_MIN_CAPABILITY:
        return (f"compute capability {cap[0]}.{cap[1]} < {TRITON_MIN_CAPABILITY[0]}.{TRITON_MIN_CAPABILITY[1]}: "
                "Triton cannot generate code for this GPU")
    return ""


def has_tensor_cores(device: torch.device) -> bool:
    """False on CUDA GPUs before Volta (P100): there channels_last can be slower than NCHW."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return True
    return tuple(torch.cuda.get_device_capability(device)) >= (7, 0)


@dataclass
class Compiled:
    model: torch.nn.Module  # the compiled module, or the eager one after a failure
    seconds: float
    error: str = ""  # why it fell back to eager ('' = compiled)
    sizes: tuple[int, ...] = ()  # the input sizes the warm-up compiled for


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
