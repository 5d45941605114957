"""The sync audit: the training and prediction loops never make the host wait for the device.

On a GPU every host read of a device tensor (`.item()`, `bool()`, `.tolist()`, `.cpu()`, a boolean
index, which runs nonzero()) stops the CPU until the GPU has finished everything queued, so the next
step is prepared while the GPU idles. CPU tensors live on the host already, so this audit records
the operations that *would* wait on a GPU: at the dispatcher, `_local_scalar_dense` (item, bool,
float, int), `nonzero`, `is_nonzero`, `equal`; in Python, `Tensor.tolist` and `.cpu`.
The real loop (Trainer.train_epoch, evaluate.predict) runs on CPU with the GPU configuration's
parts (fused AdamW, EMA, SWA, clipping, device batch augmentation with mixup and cutmix, class
weights, progressive resizing) and may read at most once per LOG_EVERY steps, and never per
prediction batch.
"""
import math
import traceback
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernelkit.data.transforms import IMAGENET, BatchAugment, normalize
from kernelkit.engine import trainer as trainer_mod
from kernelkit.engine.budget import BudgetClock, InferenceReserve
from kernelkit.engine.evaluate import predict
from kernelkit.engine.resolution import schedule_from
from kernelkit.engine.swa import create_averager
from kernelkit.engine.trainer import FitOptions, Trainer, TrainParts
from kernelkit.model.factory import create_ema, create_model
from kernelkit.model.losses import get_loss

READ_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal"}
READ_METHODS = ("tolist", "cpu")  # .numpy() needs a CPU tensor: the .cpu() before it is the read


class HostReads(TorchDispatchMode):
    """Records every host read of a tensor while active (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.reads: list[tuple[str, str]] = []

    def record(self, name: str) -> None:
        self.reads.append((name, "".join(traceback.format_stack(limit=6)[:-2])))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in READ_OPS:
            self.record(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def names(self) -> list[str]:
        return [n for n, _ in self.reads]


@pytest.fixture
def audit(monkeypatch):
    mode = HostReads()
    active = {"on": False}
    for name in READ_METHODS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            if active["on"]:
                mode.record(_name)
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)

    class Run:
        def __enter__(self):
            mode.reads.clear()
            active["on"] = True
            mode.__enter__()
            return mode

        def __exit__(self, *exc):
            mode.__exit__(*exc)
            active["on"] = False
    return Run


def _batches(n: int, batch: int = 4, size: int = 32, classes: int = 3, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8),
             torch.randint(0, classes, (batch,), generator=g), torch.ones(batch)) for _ in range(n)]


def _trainer(steps: int, classes: int = 3, rect: bool = False) -> Trainer:
    torch.manual_seed(0)
    model = create_model("test_resnet", classes)
    if rect:  # BatchNorm statistics per aspect bucket, as model_from_config builds a rect run's model
        from kernelkit.model.factory import bucket_norms
        bucket_norms(model)
    parts = TrainParts(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True),
                       scaler=torch.amp.GradScaler("cuda", enabled=False),
                       loss_fn=get_loss("ce", "multiclass", class_counts=[5, 3, 1]), ema=create_ema(model, 0.99),
                       batch_aug=BatchAugment("strong", mixup_alpha=0.4, cutmix_alpha=1.0, num_classes=classes),
                       swa=create_averager(model, 0.9))
    opts = FitOptions(lr=1e-3, epochs=1, clip_grad=1.0, resolution=schedule_from(32, 0.5, 0.5))
    trainer = Trainer(parts, opts, BudgetClock(3600), InferenceReserve(10, 10, 1), torch.device("cpu"))
    trainer.total_steps = steps  # the schedule position moves with the steps, as fit() sets it up
    trainer.schedule = trainer_mod.Progress(trainer.clock, 0.0, steps, 1.0)
    return trainer


def test_training_steps_read_the_host_at_most_once_per_log_interval(audit, monkeypatch):
    log_every = 4  # the loop reads every LOG_EVERY steps; a short interval keeps the test short
    monkeypatch.setattr(trainer_mod, "LOG_EVERY", log_every)
    steps = 2 * log_every + 3
    trainer = _trainer(steps)
    with audit() as mode:
        tr = trainer.train_epoch(_batches(steps), max_steps=steps)
    assert tr["images"] == 4 * steps and trainer.state.step == steps and math.isfinite(tr["loss"])
    allowed = -(-steps // log_every) + 1  # one per LOG_EVERY steps, one at the epoch's end
    sites = sorted({f"{n} at {where.strip().splitlines()[-2]}" for n, where in mode.reads})
    assert len(mode.reads) <= allowed, f"{len(mode.reads)} host reads in {steps} steps (allowed {allowed}): {sites}"


@pytest.mark.parametrize("views", [1, 2])
def test_prediction_batches_never_read_the_host(audit, views):
    from kernelkit.data.transforms import tta_hflip, tta_identity
    model = create_model("test_resnet", 3)
    counts = []
    for n in (3, 9):
        with audit() as mode:
            out = predict(model, _batches(n), torch.device("cpu"), "multiclass", views=(tta_identity, tta_hflip)[:views],
                          pre=IMAGENET)
        assert out["probs"].shape == (4 * n, 3)
        counts.append(len(mode.reads))
    assert counts[0] == counts[1], f"reads grow with the batches: {counts}"
    assert counts[0] <= 2, "the probabilities and the ok flags, once each, at the end"


def test_device_batch_augmentation_reads_nothing(audit):
    x, y, ok = _batches(1, batch=8)[0]
    for aug in (BatchAugment("strong", mixup_alpha=0.4, num_classes=3),
                BatchAugment("strong", cutmix_alpha=1.0, num_classes=3)):
        with audit() as mode:
            for _ in range(5):
                out, t, o = aug(x, y, ok)
        assert mode.names() == [], mode.reads[:2]
        assert out.shape == x.shape and torch.allclose(t.sum(1), torch.ones(8))


def test_statistics_and_class_weights_are_uploaded_once_per_device(monkeypatch):
    """Built from Python lists per call they were blocking uploads every step (meta stands in for
    the GPU: a device that is not the host)."""
    made = []
    real_tensor, real_to = torch.tensor, torch.Tensor.to

    def tensor(*a, **k):
        made.append(str(k.get("device", "cpu")))
        return real_tensor(*a, **k)

    def to(self, *a, **k):
        target = next((v for v in list(a) + list(k.values()) if isinstance(v, (str, torch.device))), None)
        if self.device.type == "cpu" and target is not None and torch.device(target).type == "meta":
            made.append("upload")
        return real_to(self, *a, **k)
    monkeypatch.setattr(torch, "tensor", tensor)
    monkeypatch.setattr(torch.Tensor, "to", to)
    batch = torch.zeros(2, 3, 8, 8, dtype=torch.uint8, device="meta")
    normalize(batch, False, IMAGENET)
    first = len(made)
    for _ in range(5):
        normalize(batch, False, IMAGENET)
    assert len(made) == first, "mean/std uploaded again"
    loss = get_loss("ce", "multiclass", class_counts=[5, 3, 1])
    logits, y, w = torch.zeros(4, 3, device="meta"), torch.zeros(4, dtype=torch.long, device="meta"), torch.ones(4, device="meta")
    loss(logits, y, w)
    first = len(made)
    for _ in range(5):
        loss(logits, y, w)
    assert len(made) == first, "class weights uploaded again"


def test_nonfinite_gradients_are_skipped_on_the_device_and_counted(audit):
    """bf16/fp32 have no loss scaler: a NaN batch must leave the weights and the optimizer state
    untouched, be counted, and the count comes with the loss read (no read of its own)."""
    steps = 6
    trainer = _trainer(steps)
    trainer.parts.batch_aug = None
    calls = {"n": 0}
    ce = get_loss("ce", "multiclass")

    def nan_on_third(logits, y, ok):
        calls["n"] += 1
        return ce(logits, y, ok) * (math.nan if calls["n"] == 3 else 1.0)
    trainer.parts.loss_fn = nan_on_third
    seen = {}
    real_step = trainer.guard.step

    def step(optimizer):
        if calls["n"] == 3:
            seen["before"] = [p.detach().clone() for p in trainer.core.parameters()]
            seen["state"] = [v["exp_avg"].clone() for v in optimizer.state.values()]
        out = real_step(optimizer)
        if calls["n"] == 3:
            seen["after"] = [p.detach().clone() for p in trainer.core.parameters()]
            seen["state_after"] = [v["exp_avg"].clone() for v in optimizer.state.values()]
        return out
    trainer.guard.step = step
    with audit() as mode:
        tr = trainer.train_epoch(_batches(steps), max_steps=steps)
    assert all(torch.equal(a, b) for a, b in zip(seen["before"], seen["after"])), "the NaN step changed weights"
    assert all(torch.equal(a, b) for a, b in zip(seen["state"], seen["state_after"])), "and the AdamW moments"
    assert trainer.state.nonfinite_steps == 1 and math.isfinite(tr["loss"])
    assert all(torch.isfinite(p).all() for p in trainer.core.parameters())
    assert len(mode.reads) <= 2


def test_a_plain_optimizer_still_skips_a_nonfinite_step():
    """Without a fused optimizer the guard reads its flag on the host, but the step is still skipped."""
    from kernelkit.core.accel import StepGuard
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = StepGuard(torch.amp.GradScaler("cuda", enabled=False))
    before = model.weight.detach().clone()
    (model(torch.ones(1, 3)).sum() * math.inf).backward()
    assert float(guard.step(opt)) == 1.0 and torch.equal(model.weight, before)
    opt.zero_grad()
    model(torch.ones(1, 3)).sum().backward()
    assert float(guard.step(opt)) == 0.0 and not torch.equal(model.weight, before)


class OnDevice(torch.Tensor):
    """Marks tensors that would live on the GPU (the batches and everything computed from them);
    every one made is tracked, so a test can count those still alive."""
    alive = None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, OnDevice) and cls.alive is not None:
                cls.alive[id(t)] = weakref.ref(t)
        return out


def test_prediction_keeps_at_most_one_batch_of_probabilities_on_the_device():
    """The probabilities leave the device batch by batch (held there to the end, 200k x 15k classes
    overflow a T4): while batch k runs, at most one earlier batch's probabilities are alive there."""
    OnDevice.alive = {}
    model, classes, n = create_model("test_resnet", 5), 5, 6
    held = []

    def count(_module, _inputs):
        live = [r() for r in list(OnDevice.alive.values())]
        held.append(sum(1 for t in live if t is not None and t.ndim == 2 and t.shape[1] == classes))
    model.register_forward_pre_hook(count)
    batches = [(x.as_subclass(OnDevice), y, ok) for x, y, ok in _batches(n, classes=classes)]
    try:
        out = predict(model, batches, torch.device("cpu"), "multiclass", pre=IMAGENET)
    finally:
        OnDevice.alive = None
    assert out["probs"].shape == (4 * n, classes) and type(out["probs"]).__module__ == "numpy"
    assert len(held) == n and max(held) <= 1, f"device-held probability batches at each forward: {held}"


def test_ranks_agree_each_step_over_a_cpu_group_even_under_nccl(monkeypatch):
    """Under NCCL the per-step stop/progress broadcast used a GPU tensor: an upload and two reads
    back every step. It goes over a gloo group of CPU tensors now."""
    from kernelkit.core import distributed
    sent = []
    monkeypatch.setattr(distributed.dist, "new_group",
                        lambda backend=None, timeout=None: f"group:{backend}:{timeout.total_seconds():.0f}")

    def broadcast(t, src, group=None):
        sent.append((t.device.type, group))
        t.copy_(torch.tensor([1.0, 0.25], dtype=t.dtype))  # what rank 0 decided
    monkeypatch.setattr(distributed.dist, "broadcast", broadcast)
    distributed._CONTROL.clear()
    distributed._CONTROL["timeout_s"] = 5400.0  # as init() records the process group's timeout
    info = distributed.DistInfo(rank=1, world_size=2, local_rank=1, backend="nccl")
    try:
        assert distributed.agree(info, False, 0.1) == (True, 0.25)
        assert distributed.agree(info, False, 0.2) == (True, 0.25)
    finally:
        distributed._CONTROL.clear()
    assert sent == [("cpu", "group:gloo:5400")] * 2, "one gloo group, made once, CPU tensors only, same timeout"


def test_the_cuda_path_of_host_chunks_reuses_a_ring_of_pinned_buffers(monkeypatch):
    """On CUDA the batches go through `ring` reused pinned staging buffers (pinned per batch, 12 GB
    of probabilities would stay page-locked in torch's host cache), each landed `ring` batches later."""
    from kernelkit.engine.evaluate import HostChunks
    pinned, waited = [], []
    real_empty = torch.empty

    def empty(*a, pin_memory=False, **k):
        out = real_empty(*a, **k)
        if pin_memory:
            pinned.append(out)
        return out

    class Event:
        made = 0

        def __init__(self):
            self.n, Event.made = Event.made, Event.made + 1

        def record(self, stream=None):
            pass

        def synchronize(self):
            waited.append(self.n)
    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    chunks = HostChunks(torch.device("cuda"), ring=2)
    batches = [torch.full((3, 4), float(i)) for i in range(6)] + [torch.full((1, 4), 9.0)]
    for b in batches:
        chunks.add(b)
        b.fill_(-1.0)  # later kernels reuse the batch memory (stream-ordered after the copy)
    assert len(pinned) == 3, "two staging buffers in turn, one more for the short last batch"
    assert waited == [0, 1, 2, 3, 4], "each landing waits for that batch's copy only"
    out = chunks.gather()
    assert waited == [0, 1, 2, 3, 4, 5, 6]
    assert torch.equal(out, torch.cat([torch.full((3, 4), float(i)) for i in range(6)] + [torch.full((1, 4), 9.0)]))
    assert not chunks.free and not chunks.pending


def _rect_batches(n: int, batch: int = 4, classes: int = 3, seed: int = 0) -> list:
    """input_mode rect: each batch one bucket's shape, the shape changing from batch to batch."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(32, 32), (24, 40), (40, 24), (16, 64), (64, 16)]
    return [(torch.randint(0, 256, (batch, 3, *shapes[k % len(shapes)]), generator=g, dtype=torch.uint8),
             torch.randint(0, classes, (batch,), generator=g), torch.ones(batch)) for k in range(n)]


def test_rect_batches_of_changing_shapes_read_the_host_no_more_than_squares(audit, monkeypatch):
    """Rect batches change shape every step (strong augmentation, mixup/cutmix and progressive resizing
    run on rectangles; BatchNorm swaps in each bucket's statistics): still one read per LOG_EVERY steps,
    and none per prediction batch."""
    log_every = 4
    monkeypatch.setattr(trainer_mod, "LOG_EVERY", log_every)
    steps = 2 * log_every + 3
    trainer = _trainer(steps, rect=True)
    with audit() as mode:
        tr = trainer.train_epoch(_rect_batches(steps), max_steps=steps)
    assert tr["images"] == 4 * steps and math.isfinite(tr["loss"])
    assert len(mode.reads) <= -(-steps // log_every) + 1
    model = trainer.parts.model
    with audit() as mode:
        out = predict(model, _rect_batches(7), torch.device("cpu"), "multiclass", pre=IMAGENET)
    assert out["probs"].shape == (28, 3) and len(mode.reads) <= 2
