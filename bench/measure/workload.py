"""A workload: one model, one batch shape, one phase — and the bench that runs its steps.

    workload = Workload("deq-transformer", mode="core", phase="train", batch=15, seq_len=150)
    bench = Bench(workload)           # model, Adam (train), inputs; nothing run yet
    bench.warm_up()                   # one step: Adam state exists, lazy buffers too
    stats = bench.step()              # forward + backward + optimizer step -> ModelStats

The same code builds a bench of fake tensors (`with fake_tensors(): Bench(workload, fake=True)`),
which is how `predicted` sees the memory of a step without allocating it (`bench.prime()` gives it
the state of a warmed-up bench at a fraction of a warm-up's cost), and it is the step that
training (bench.train) runs on real data: `bench.feed(x, y)` before `bench.step()`, with the
learning rate, weight decay and gradient clipping of the training recipe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from models import ModelStats, build_model, fixed_iterations

PHASES = ("train", "eval")
MODES = ("core", "lm")
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
LEARNING_RATE = 1e-4  # small: measured steps should not move a DEQ far from where it converges


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What one measured step is. Frozen and hashable: a case of the runner maps onto one."""

    model: str
    size: str = "debug"
    mode: str = "core"  # core: embedded inputs (B, T, d_model), no embedding/softmax
    phase: str = "train"  # train: forward + backward + Adam step; eval: forward under no_grad
    batch: int = 2
    seq_len: int = 32
    depth: int | None = None  # explicit models only; None = the size's own depth
    overrides: tuple[tuple[str, Any], ...] = ()  # config fields, e.g. (("solver", "anderson"),)
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        for field, value, valid in (
            ("mode", self.mode, MODES), ("phase", self.phase, PHASES), ("dtype", self.dtype, DTYPES)
        ):
            if value not in valid:
                raise ValueError(f"unknown {field} {value!r}; valid: {', '.join(valid)}")
        for field in ("batch", "seq_len"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        torch.device(self.device)  # raises on a malformed device string

    @property
    def tokens(self) -> int:
        """Tokens per step."""
        return self.batch * self.seq_len


class ObservedFakeTensorMode(FakeTensorMode):
    """A FakeTensorMode that hands each op it is asked to run to an `observer` (the `predicted`
    counter: `observe(func, args, kwargs, run) -> out`, calling `run()` for the fake result).
    Hosted here, an observer costs only its own bookkeeping; stacked on the fake mode as a second
    dispatch mode it costs a Python round trip per op (+40% on a fake step). Ops the fake mode
    runs inside an op (its decompositions) are not observed: a mode above it would not see them."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.observer: Any = None
        self._inside = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        observer = self.observer
        if observer is None or self._inside:
            return super().__torch_dispatch__(func, types, args, kwargs)
        self._inside += 1
        try:
            return observer.observe(
                func, args, kwargs,
                lambda: super(ObservedFakeTensorMode, self).__torch_dispatch__(func, types, args, kwargs))
        finally:
            self._inside -= 1


@contextlib.contextmanager
def fake_tensors() -> Iterator[ObservedFakeTensorMode]:
    """Every tensor made inside is fake (shapes, no data) and every solve runs exactly max_iter
    iterations (a fake residual has no value to stop on)."""
    with ObservedFakeTensorMode(allow_non_fake_inputs=True) as mode, fixed_iterations():
        yield mode


def fake_device(workload: Workload) -> torch.device:
    """Where a fake bench puts its tensors. Fake CUDA tensors need a CUDA build of torch (on a CPU
    build autograd aborts the process), so elsewhere a CUDA workload is predicted on fake CPU
    tensors: same shapes and ops, CPU kernels' choices (e.g. CPU flash attention)."""
    device = torch.device(workload.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return device


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class Bench:
    """A workload built: model, optimizer (train), inputs and targets, and `step()`.

    `fake=True` builds on `fake_device(workload)`; call it inside `fake_tensors()`. `lr`,
    `weight_decay` and `clip` (gradient-norm clipping, 0 = off) set the optimizer step;
    `grad_norm=True` keeps each step's gradient norm in `self.grad_norm` (clipping does anyway);
    `keep_loss=True` keeps each step's loss in `self.loss` (detached; reading it is a host sync,
    the caller's choice). Both are off for measurements: a loss kept alive through the optimizer
    step is memory the step would not otherwise hold (MSE's scalar holds an input-sized storage)."""

    def __init__(self, workload: Workload, *, fake: bool = False, lr: float = LEARNING_RATE,
                 weight_decay: float = 0.0, clip: float = 0.0, grad_norm: bool = False,
                 keep_loss: bool = False) -> None:
        w = workload
        self.workload = w
        self.fake = fake
        self.device = fake_device(w) if fake else torch.device(w.device)
        dtype = DTYPES[w.dtype]
        torch.manual_seed(w.seed)
        # Built in place on its device and dtype: no CPU copy of a large model, and fake
        # parameters cannot be converted afterwards (Module.to swaps them, which fake mode forbids).
        with torch.device(self.device), _default_dtype(dtype):
            model = build_model(w.model, w.size, mode=w.mode, depth=w.depth, **dict(w.overrides))
        if not fake:  # whatever the builder made elsewhere on purpose or not
            model = model.to(device=self.device, dtype=dtype)
        self.model: nn.Module = model.train(w.phase == "train")
        self.optimizer: torch.optim.Optimizer | None = None
        if w.phase == "train":
            # foreach is what Adam picks by itself on CUDA; fixing it from the *workload's* device
            # lets a fake CPU bench predict a CUDA step's optimizer temporaries too.
            self.optimizer = torch.optim.Adam(
                self.model.parameters(), lr=lr, weight_decay=weight_decay,
                foreach=torch.device(w.device).type == "cuda",
            )
        self.clip = clip
        self.keep_grad_norm = grad_norm or clip > 0
        self.keep_loss = keep_loss
        self.loss: Tensor | None = None
        self.grad_norm: Tensor | None = None
        generator = torch.Generator().manual_seed(w.seed)
        config = self.model.config
        self.targets: Tensor | None = None
        if w.mode == "lm":
            shape = (w.batch, w.seq_len)
            self.inputs = torch.randint(0, config.vocab_size, shape, generator=generator).to(self.device)
            self.targets = torch.randint(0, config.vocab_size, shape, generator=generator).to(self.device)
        else:  # core: targets are noise of the output's shape, made at the first step
            shape = (w.batch, w.seq_len, config.d_model)
            self.inputs = torch.randn(shape, generator=generator).to(self.device, dtype)  # (B, T, d)
        self._generator = generator
        self.memory: Any = None  # segment state of the last step (models with mem_len > 0)
        self.steps = 0

    @property
    def tokens_per_step(self) -> int:
        return self.workload.tokens

    def state(self) -> tuple[Any, ...]:
        """Everything that lives across steps: model, optimizer state, inputs, targets, and the
        segment memory a Transformer-XL-style model carries to the next step."""
        return (self.model, self.optimizer, self.inputs, self.targets, self.memory)

    def feed(self, inputs: Tensor, targets: Tensor | None = None) -> None:
        """The next step's batch (training on data: token ids (B, T) and next tokens)."""
        self.inputs, self.targets = inputs.to(self.device), None if targets is None else targets.to(self.device)

    def step(self) -> ModelStats:
        if self.optimizer is None:
            with torch.no_grad():
                _, stats = self._loss()
        else:
            loss, stats = self._loss()
            loss.backward()
            if self.keep_loss:
                self.loss = loss.detach()
            del loss
            if self.keep_grad_norm:
                self.grad_norm = self._grad_norm()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return stats

    def _grad_norm(self) -> Tensor:
        """The total gradient norm before clipping; clipped to `clip` when set."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.clip:
            return torch.nn.utils.clip_grad_norm_(params, self.clip)
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))

    def warm_up(self, steps: int = 1) -> ModelStats | None:
        """Run `steps` unmeasured steps: Adam's state, lazily made buffers and (on CUDA) the
        allocator's cache exist afterwards, so static memory is in place before a measurement."""
        stats = None
        for _ in range(steps):
            stats = self.step()
        return stats

    def prime(self, steps: int = 1) -> None:
        """What `warm_up(steps)` leaves behind, for a fake bench, at a fraction of its cost: each
        training step's forward and loss (which make the segment memory, core-mode targets and
        lazily made buffers) and then, instead of backward, the optimizer's step on zero gradients
        of exactly the parameters the loss reaches (Adam makes its state as at a real first
        step). Eval steps are forward passes: those run as they are. Fake benches only: a real
        bench's optimizer state would hold other values than after real steps."""
        if not self.fake:
            raise RuntimeError("prime() is for fake benches; warm a real one up with warm_up()")
        if self.optimizer is None:
            self.warm_up(steps)
            return
        for _ in range(steps):
            loss, stats = self._loss()
            reached = _parameters_reached(loss)
            del loss, stats
            for p in reached:
                p.grad = torch.zeros_like(p)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.steps += 1

    def static_bytes(self, round_to: int = 1) -> int:
        """Params and buffers + one gradient per trainable param + optimizer state, each storage
        rounded up to `round_to` bytes; only tensors on the bench's device type count."""
        sizes: dict[Any, int] = {}

        def add(key: Any, t: Tensor) -> None:
            if t.device.type == self.device.type:
                sizes[key] = t.untyped_storage().nbytes()

        for t in (*self.model.parameters(), *self.model.buffers()):
            add(t.untyped_storage()._cdata, t)
        if self.optimizer is not None:
            for p in self.model.parameters():
                if p.requires_grad:  # grads are None between steps; count what backward makes
                    sizes[("grad", id(p))] = p.numel() * p.element_size()
            for state in self.optimizer.state.values():
                for t in state.values():
                    if isinstance(t, Tensor):
                        add(t.untyped_storage()._cdata, t)
        return sum(-(-n // round_to) * round_to for n in sizes.values())

    def num_params(self, non_embedding: bool = False) -> int:
        count = getattr(self.model, "num_params", None)
        if count is not None:
            return count(non_embedding=non_embedding)
        return sum(p.numel() for p in self.model.parameters())

    def _loss(self) -> tuple[Tensor, ModelStats]:
        # Segment memory (mem_len > 0) is carried from step to step, as in training, so a
        # measured step after warm-up attends to a full memory (the paper's tgt 150 + mem 150).
        memory = {} if self.memory is None else {"memory": self.memory}
        if self.targets is None:  # first core-mode step: the output's width is the model's business
            output, stats = self.model(self.inputs, **memory)
            self.targets = torch.randn(output.shape, generator=self._generator).to(
                device=self.device, dtype=output.dtype
            )
            loss = self.model.loss(output, self.targets)
        else:
            loss, stats = self.model(self.inputs, targets=self.targets, **memory)
        self.memory = stats.memory
        return loss, stats


def _parameters_reached(loss: Tensor) -> list[Tensor]:
    """The leaves that `loss.backward()` would give a gradient: the AccumulateGrad nodes of its
    graph (checkpointed segments included: non-reentrant checkpointing records the graph)."""
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    leaves: list[Tensor] = []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)
        if leaf is not None:
            leaves.append(leaf)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves
