r"""Inner-training task suite for learned-optimizer experiments.

A :class:`Task` owns a list of parameter tensors (functional: no ``nn.Module``) and exposes

* ``init(generator) -> list[Tensor]``: initial parameters;
* ``sample(generator) -> batch``: one minibatch (``None`` for deterministic tasks);
* ``loss(params, batch) -> Tensor``: a scalar training loss.

Families (``FAMILIES``; each task seed also draws the family's hyperparameters):

* ``"quadratic"``: ``L(x) = 1/2 (x - x*)^T A (x - x*) / d`` for ``x [d]`` with
  ``A = Q diag(lambda) Q^T``, ``Q`` random orthogonal, ``lambda`` log-spaced over a condition
  number ``kappa in [10, 1000]``, ``d in [8, 32]``; ``x0 ~ N(0, I)``; minibatch noise: the
  gradient sees ``x* + sigma z`` (sigma = 0.1).
* ``"rosenbrock"``: ``L(x) = mean_i [b (x_{i+1} - x_i^2)^2 + (a - x_i)^2]`` for
  ``x [d]``, ``d in [2, 8]``, ``a in [0.5, 1.5]``, ``b in [5, 50]``, ``x0 ~ U(-2, 2)``.
* ``"mlp"``: an MLP ``64 -> h -> 10`` (``h in {16, 32, 64}``, tanh or ReLU) on scikit-learn's
  8x8 digits (offline, 1797 images, pixels / 16), cross entropy, batch 64.
* ``"conv"``: conv 3x3 (1 -> c) -> ReLU -> conv 3x3 stride 2 (c -> c) -> ReLU -> global mean
  pool -> linear to 10 classes on the same digits (``c in {4, 8}``), batch 32.
* ``"molecule"``: random point clouds of 4..8 "atoms" in a ``[0, 2]^3`` box; the target is a
  pair energy ``E = sum_{i<j} exp(-|r_i - r_j|)`` (dimensionless); the model is
  ``E_hat = sum_{i<j} MLP(rbf(|r_i - r_j|))`` (8 Gaussian radial basis functions, hidden 16),
  mean-squared error on a batch of 16 clouds.

Splits (:func:`split_tasks`): task seeds ``[0, 10^4)`` meta-train, ``[10^4, 2 10^4)``
meta-validation, ``[2 10^4, 3 10^4)`` held-out test; the family of the ``i``-th task cycles
through the requested families.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

FAMILIES = ("quadratic", "rosenbrock", "mlp", "conv", "molecule")
SPLIT_OFFSETS = {"train": 0, "valid": 10_000, "test": 20_000}


class Task:
    """Base class: ``init``, ``sample``, ``loss`` (see the module docstring)."""

    family: str = ""

    def __init__(self, seed: int, dtype: torch.dtype = torch.float32) -> None:
        self.seed = seed
        self.dtype = dtype
        self.rng = torch.Generator().manual_seed(seed)  # draws the task's own constants

    @property
    def name(self) -> str:
        return f"{self.family}-{self.seed}"

    def init(self, generator: torch.Generator) -> list[Tensor]:
        raise NotImplementedError

    def sample(self, generator: torch.Generator) -> Any:
        return None

    def loss(self, params: Sequence[Tensor], batch: Any) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed})"


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    return int(torch.randint(low, high + 1, (1,), generator=gen))


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen, dtype=torch.float64))


class QuadraticTask(Task):
    """Random ill-conditioned quadratic with noisy gradients (see the module docstring)."""

    family = "quadratic"

    def __init__(self, seed: int, dtype: torch.dtype = torch.float32, noise: float = 0.1) -> None:
        super().__init__(seed, dtype)
        d = _randint(self.rng, 8, 32)
        kappa = 10 ** _uniform(self.rng, 1.0, 3.0)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=self.rng, dtype=torch.float64))
        lam = torch.logspace(0, math.log10(kappa), d, dtype=torch.float64)
        self.a = ((q * lam) @ q.T).to(dtype)  # [d, d]
        self.target = torch.randn(d, generator=self.rng, dtype=torch.float64).to(dtype)
        self.dim, self.noise = d, noise

    def init(self, generator: torch.Generator) -> list[Tensor]:
        return [torch.randn(self.dim, generator=generator, dtype=torch.float64).to(self.dtype)]

    def sample(self, generator: torch.Generator) -> Tensor:
        z = torch.randn(self.dim, generator=generator, dtype=torch.float64).to(self.dtype)
        return self.target + self.noise * z

    def loss(self, params: Sequence[Tensor], batch: Tensor | None) -> Tensor:
        r = params[0] - (self.target if batch is None else batch)
        return 0.5 * r @ (self.a @ r) / self.dim


class RosenbrockTask(Task):
    """Generalised Rosenbrock function (deterministic; see the module docstring)."""

    family = "rosenbrock"

    def __init__(self, seed: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(seed, dtype)
        self.dim = _randint(self.rng, 2, 8)
        self.a = _uniform(self.rng, 0.5, 1.5)
        self.b = 10 ** _uniform(self.rng, math.log10(5), math.log10(50))

    def init(self, generator: torch.Generator) -> list[Tensor]:
        x = torch.rand(self.dim, generator=generator, dtype=torch.float64) * 4 - 2
        return [x.to(self.dtype)]

    def loss(self, params: Sequence[Tensor], batch: None = None) -> Tensor:
        x = params[0]
        return (self.b * (x[1:] - x[:-1] ** 2) ** 2 + (self.a - x[:-1]) ** 2).mean()


@lru_cache(maxsize=1)
def _digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits (bundled, offline): images ``[1797, 64]`` in [0, 1], labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float64) / 16.0
    return x, torch.tensor(data.target, dtype=torch.long)


def _glorot(gen: torch.Generator, fan_in: int, shape: Sequence[int], dtype) -> Tensor:
    w = torch.randn(*shape, generator=gen, dtype=torch.float64) / math.sqrt(fan_in)
    return w.to(dtype)


class MLPTask(Task):
    """One-hidden-layer MLP classifier on the digits (see the module docstring)."""

    family = "mlp"

    def __init__(self, seed: int, dtype: torch.dtype = torch.float32, batch_size: int = 64) -> None:
        super().__init__(seed, dtype)
        self.hidden = (16, 32, 64)[_randint(self.rng, 0, 2)]
        self.act = (torch.tanh, torch.relu)[_randint(self.rng, 0, 1)]
        self.batch_size = batch_size

    def init(self, generator: torch.Generator) -> list[Tensor]:
        h, dt = self.hidden, self.dtype
        return [
            _glorot(generator, 64, (64, h), dt),
            torch.zeros(h, dtype=dt),
            _glorot(generator, h, (h, 10), dt),
            torch.zeros(10, dtype=dt),
        ]

    def sample(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x, y = _digits()
        idx = torch.randint(0, x.shape[0], (self.batch_size,), generator=generator)
        return x[idx].to(self.dtype), y[idx]

    def loss(self, params: Sequence[Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        w1, b1, w2, b2 = params
        x, y = batch
        return F.cross_entropy(self.act(x @ w1 + b1) @ w2 + b2, y)


class ConvTask(Task):
    """Two-layer conv net on the 8x8 digits (see the module docstring)."""

    family = "conv"

    def __init__(self, seed: int, dtype: torch.dtype = torch.float32, batch_size: int = 32) -> None:
        super().__init__(seed, dtype)
        self.channels = (4, 8)[_randint(self.rng, 0, 1)]
        self.batch_size = batch_size

    def init(self, generator: torch.Generator) -> list[Tensor]:
        c, dt = self.channels, self.dtype
        return [
            _glorot(generator, 9, (c, 1, 3, 3), dt),
            torch.zeros(c, dtype=dt),
            _glorot(generator, 9 * c, (c, c, 3, 3), dt),
            torch.zeros(c, dtype=dt),
            _glorot(generator, c, (c, 10), dt),
            torch.zeros(10, dtype=dt),
        ]

    def sample(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x, y = _digits()
        idx = torch.randint(0, x.shape[0], (self.batch_size,), generator=generator)
        return x[idx].to(self.dtype).view(-1, 1, 8, 8), y[idx]

    def loss(self, params: Sequence[Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        w1, b1, w2, b2, w3, b3 = params
        x, y = batch
        h = torch.relu(F.conv2d(x, w1, b1, padding=1))
        h = torch.relu(F.conv2d(h, w2, b2, stride=2, padding=1))
        return F.cross_entropy(h.mean((2, 3)) @ w3 + b3, y)


class MoleculeTask(Task):
    """Pair-potential regression on random point clouds (see the module docstring)."""

    family = "molecule"
    num_rbf = 8

    def __init__(self, seed: int, dtype: torch.dtype = torch.float32, batch_size: int = 16) -> None:
        super().__init__(seed, dtype)
        self.hidden = 16
        self.batch_size = batch_size
        self.max_atoms = _randint(self.rng, 5, 8)

    def init(self, generator: torch.Generator) -> list[Tensor]:
        h, dt = self.hidden, self.dtype
        return [
            _glorot(generator, self.num_rbf, (self.num_rbf, h), dt),
            torch.zeros(h, dtype=dt),
            _glorot(generator, h, (h,), dt),
        ]

    def sample(self, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``pos [b, a, 3]``, ``mask [b, a]`` (True = atom), ``energy [b]``."""
        b, a = self.batch_size, self.max_atoms
        pos = torch.rand(b, a, 3, generator=generator, dtype=torch.float64) * 2
        counts = torch.randint(4, a + 1, (b,), generator=generator)
        mask = torch.arange(a)[None] < counts[:, None]
        pair = _pair_mask(mask)
        dist = torch.cdist(pos, pos)
        energy = (torch.exp(-dist) * pair).sum((1, 2))
        return pos.to(self.dtype), mask, energy.to(self.dtype)

    def loss(self, params: Sequence[Tensor], batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        w1, b1, w2 = params
        pos, mask, energy = batch
        dist = (pos[:, :, None] - pos[:, None]).pow(2).sum(-1).add(1e-12).sqrt()  # [b, a, a]
        centers = torch.linspace(0, 3.5, self.num_rbf, dtype=pos.dtype)
        rbf = torch.exp(-((dist[..., None] - centers) ** 2) / 0.5)  # [b, a, a, r]
        pair_energy = torch.tanh(rbf @ w1 + b1) @ w2  # [b, a, a]
        pred = (pair_energy * _pair_mask(mask).to(pos.dtype)).sum((1, 2))
        return (pred - energy).pow(2).mean()


def _pair_mask(mask: Tensor) -> Tensor:
    """``[b, a, a]`` float mask of pairs ``i < j`` of present atoms."""
    upper = torch.ones(mask.shape[1], mask.shape[1], dtype=torch.bool).triu(1)
    return (mask[:, :, None] & mask[:, None] & upper).double()


TASK_CLASSES: dict[str, type[Task]] = {
    "quadratic": QuadraticTask,
    "rosenbrock": RosenbrockTask,
    "mlp": MLPTask,
    "conv": ConvTask,
    "molecule": MoleculeTask,
}


def make_task(family: str, seed: int, dtype: torch.dtype = torch.float32) -> Task:
    """Build the task of ``family`` drawn by ``seed``."""
    if family not in TASK_CLASSES:
        raise ValueError(f"unknown task family {family!r}; choose from {FAMILIES}")
    return TASK_CLASSES[family](seed, dtype=dtype)


@dataclass(frozen=True)
class TaskSpec:
    """A (family, seed) pair; ``build()`` makes the task."""

    family: str
    seed: int

    def build(self, dtype: torch.dtype = torch.float32) -> Task:
        return make_task(self.family, self.seed, dtype)


def split_tasks(split: str, families: Sequence[str], count: int) -> list[TaskSpec]:
    """``count`` task specs of ``split`` (``"train"``, ``"valid"``, ``"test"``), families cycled.

    Seeds of different splits never overlap (offsets ``SPLIT_OFFSETS``).
    """
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"split must be one of {tuple(SPLIT_OFFSETS)}, got {split!r}")
    for family in families:
        if family not in TASK_CLASSES:
            raise ValueError(f"unknown task family {family!r}; choose from {FAMILIES}")
    base = SPLIT_OFFSETS[split]
    return [TaskSpec(families[i % len(families)], base + i) for i in range(count)]
