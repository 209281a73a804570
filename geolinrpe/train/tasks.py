r"""Training tasks: how a dataset becomes batches, a loss, metrics and predictions.

===============  ====================================  =================  ===================
``data.task``    data                                  loss               metrics (main first)
===============  ====================================  =================  ===================
``qm9``          :class:`~geolinrpe.data.qm9.QM9`      l1/mse/huber on    ``mae`` (target
                 targets by name                       standardised y     unit, meV printed
                                                                          for energies)
``oc20-is2re``   :class:`~geolinrpe.data.oc20.OC20`    as qm9, on         ``energy_mae`` (eV)
                 ``y_relaxed``                         ``y_relaxed``
``oc20-s2ef``    OC20 energy + forces                  energy + forces    ``forces_mae``
                                                                          (eV/A),
                                                                          ``energy_mae`` (eV)
``point-cloud``  :class:`~geolinrpe.data.SyntheticShapes`  cross-entropy  ``accuracy``
``patch``        8x8 digits as 2x2 patches             cross-entropy      ``accuracy``
``sequence``     characters of local text files        cross-entropy      ``perplexity``
===============  ====================================  =================  ===================

A task is built from a :class:`~geolinrpe.train.config.Config` and, when a model is reloaded,
the ``state`` saved in its checkpoint (normalisation statistics, class names, vocabulary), so
evaluation and prediction need no training data. Metrics are accumulated as sums
(:meth:`Task.batch_stats`) so that distributed runs add them over processes before
:meth:`Task.compute_metrics` divides.

Axes in comments: g graphs (molecules, clouds, images, sequences), n tokens, t targets,
c classes or vocabulary entries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset, Subset
from torch_geometric.data import Batch, Data

from ..data.batching import collate_packed
from .config import Config

__all__ = [
    "TASKS",
    "CharacterSequences",
    "ClassificationTask",
    "OC20IS2RETask",
    "OC20S2EFTask",
    "PatchTask",
    "PointCloudTask",
    "QM9Task",
    "SequenceTask",
    "Task",
    "build_task",
]

QM9_ELEMENTS = {1, 6, 7, 8, 9}


def _regression_loss(kind: str, residual: Tensor, count: Tensor | float | None = None) -> Tensor:
    """Loss of standardised residuals, ``l1``, ``mse`` or ``huber`` (delta 1), summed and
    divided by ``count`` (default: their number, i.e. the mean)."""
    if kind == "l1":
        total = residual.abs().sum()
    elif kind == "mse":
        total = residual.pow(2).sum()
    else:
        total = F.huber_loss(residual, torch.zeros_like(residual), reduction="sum")
    return total / (residual.numel() if count is None else count)


def _split_sizes(n: int, valid: int | None, test: int | None) -> tuple[int, int, int]:
    """Train/valid/test sizes out of ``n`` items (10 % each for valid and test by default)."""
    valid = max(1, n // 10) if valid is None else valid
    test = max(1, n // 10) if test is None else test
    if valid + test >= n:
        raise ValueError(
            f"config keys 'data.valid_size' + 'data.test_size' ({valid} + {test}) leave no "
            f"training items out of {n}"
        )
    return n - valid - test, valid, test


def _random_split(n: int, seed: int, valid: int | None, test: int | None):
    """Index tensors ``(train, valid, test)`` of a seeded random permutation of ``n``."""
    n_train, n_valid, _ = _split_sizes(n, valid, test)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_train], perm[n_train : n_train + n_valid], perm[n_train + n_valid :]


def _first(indices: Tensor, size: int | None, key: str) -> Tensor:
    """The first ``size`` indices of a split (all for ``None``); too few names ``key``."""
    if size is None:
        return indices
    if size > len(indices):
        raise ValueError(f"config key {key!r} asks for {size} items, the split has {len(indices)}")
    return indices[:size]


def _result_metric(key: str) -> str:
    """The metric of a result key: ``best_valid_mae``, ``valid_mae``, ``test_mae`` -> ``mae``."""
    for prefix in ("best_valid_", "valid_", "test_"):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


class Task:
    """Base class: one dataset family, its loss, metrics and prediction rows.

    Subclasses set :attr:`name`, :attr:`main_metric`, :attr:`metric_names` and implement
    :meth:`datasets`, :meth:`fit_state`, :meth:`model_kwargs`, :meth:`loss`,
    :meth:`batch_stats`, :meth:`compute_metrics` and :meth:`prediction_rows`.

    Args:
        cfg: the run's configuration.
        state: statistics saved in a checkpoint (``None``: call :meth:`fit_state` on the
            training split before building a model).
    """

    name: ClassVar[str]
    main_metric: ClassVar[str]
    higher_is_better: ClassVar[bool] = False
    needs_grad: ClassVar[bool] = False  # the forward pass differentiates (forces)
    accepts_structures: ClassVar[bool] = False  # predict from SMILES or structure files
    position_unit: ClassVar[str | None] = None  # unit of the positions (RPE plot axes)

    def __init__(self, cfg: Config, state: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.state: dict[str, Any] = dict(state) if state is not None else {}

    global_item_mean: bool = False
    """Whether per-item losses are averaged over the global batch (:meth:`item_count`):
    set by the trainer for ``data.balance: atoms`` in a data-parallel run."""

    def item_count(self, count: int, device: torch.device) -> Tensor | None:
        """The divisor of a loss averaged over ``count`` items (graphs, sequences, tokens) of
        this process's batch: ``None`` (the loss takes its own mean over ``count``), or,
        with :attr:`global_item_mean`, :meth:`shard_count` of ``count`` (a 0-d tensor;
        the processes' numbers of items differ, and the average of their gradients must be
        the gradient of the mean over the global batch). A collective call in a
        data-parallel run: every process makes it at every step."""
        if not self.global_item_mean:
            return None
        return self.shard_count(torch.tensor(float(count), device=device))

    def shard_count(self, count: Tensor) -> Tensor:
        """This process's share of a count summed over the processes of a data-parallel run
        (``sum / world_size``; the count itself in one process). A loss averaged over
        items whose number differs between processes (atoms) divides by it, so that the
        average of the processes' gradients is the gradient of the global mean. The trainer
        sets it under ``torchrun``."""
        return count

    # ------------------------------------------------------------------------------ data
    def datasets(self) -> dict[str, Dataset | None]:
        """``{"train": ..., "valid": ..., "test": ... or None}``."""
        raise NotImplementedError

    def fit_state(self, train: Dataset) -> None:
        """Statistics of the training split the model needs (e.g. target mean/std)."""

    def collate(self, items: Sequence[Data]) -> Batch:
        """Items -> one packed PyG batch (``batch [n]`` graph ids)."""
        return collate_packed(items)

    def check_item(self, item: Data) -> str | None:
        """Why a new input (``geolinrpe predict``) cannot be predicted, or ``None``."""
        return None

    def forward(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        """Run ``model`` on a batch; outputs as a dict (a bare tensor becomes ``{"y": ...}``)."""
        out = model(batch)
        return out if isinstance(out, dict) else {"y": out}

    # ----------------------------------------------------------------------------- model
    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`geolinrpe.models.build_model` that follow from the
        data (``num_targets``, normalisation); added to the config's model options."""
        raise NotImplementedError

    # --------------------------------------------------------------------- loss, metrics
    @property
    def metric_names(self) -> list[str]:
        """Names of the metrics :meth:`compute_metrics` returns (``loss`` first)."""
        return ["loss", self.main_metric]

    def loss(self, out: dict[str, Tensor], batch: Batch) -> Tensor:
        """The training loss of one batch (a mean over its graphs or tokens)."""
        raise NotImplementedError

    def batch_stats(self, out: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """Sums over one batch (float64 tensors, fixed keys) that :meth:`compute_metrics`
        turns into metrics; summed over batches and processes."""
        raise NotImplementedError

    def compute_metrics(self, sums: dict[str, Tensor]) -> dict[str, float]:
        """Metrics from the summed :meth:`batch_stats`."""
        raise NotImplementedError

    def metric_unit(self, metric: str) -> str:
        """The unit of a metric (``""`` for dimensionless ones)."""
        return ""

    def display(self, metric: str, value: float) -> tuple[float, str]:
        """``value`` of ``metric`` (in :meth:`metric_unit`) in the unit it is printed in, and
        that unit: QM9 energies in eV print in meV (``0.0921`` -> ``(92.1, "meV")``), the
        rest in their own unit (``""``: dimensionless)."""
        unit = self.metric_unit(metric)
        if unit == "eV" and self.name == "qm9":
            return value * 1000, "meV"
        return value, unit

    def result_units(self, results: dict[str, Any]) -> dict[str, str]:
        """The unit of every key of a results or metrics mapping (:func:`~geolinrpe.train.run`,
        ``results.json``, ``geolinrpe eval --json``), as stored there (eV, not meV):
        ``valid_mae``/``test_mae``/``best_valid_mae`` take the unit of ``mae``,
        ``elapsed_s`` is ``s``, and counts and dimensionless metrics are ``""``."""
        return {
            key: "s" if key == "elapsed_s" else self.metric_unit(_result_metric(key))
            for key in results
        }

    def display_result(self, key: str, value: float) -> tuple[float, str]:
        """As :meth:`display` for a key of :meth:`result_units` (``test_mae``, ...)."""
        if key == "elapsed_s":
            return value, "s"
        return self.display(_result_metric(key), value)

    def format_metrics(self, metrics: dict[str, float], prefix: str = "") -> str:
        """One line: ``loss 0.1234 | MAE gap 123.4 meV``; energies in eV print in meV."""
        parts = []
        for name in self.metric_names:
            key = prefix + name
            if key not in metrics:
                continue
            value, unit = self.display(name, metrics[key])
            if unit == "meV":
                parts.append(f"{name} {value:.1f} meV")
            elif unit:
                parts.append(f"{name} {value:.4f} {unit}")
            else:
                parts.append(f"{name} {value:.4f}")
        return " | ".join(parts)

    # ------------------------------------------------------------------------ prediction
    def prediction_rows(self, out: dict[str, Tensor], batch: Batch) -> list[dict[str, Any]]:
        """One row (column -> value) per graph of the batch: predictions, and targets when
        the batch has them."""
        raise NotImplementedError

    def prediction_columns(self) -> list[str]:
        """Column names :meth:`prediction_rows` fills, in order."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------ QM9
class QM9Task(Task):
    """Regress QM9 targets by name (``data.targets``).

    Targets are standardised with the training split's mean and std (of the target minus
    the atom references for U0/U/H/G), which the model stores as buffers and uses to output
    physical units; the loss is ``train.loss`` on ``(prediction - y) / std``. Metrics: ``mae``
    (the target's unit for one target; for several, the mean of ``MAE / std``), ``mae_<name>``
    per target when there are several, and ``loss``.
    """

    position_unit = "Å"

    name = "qm9"
    main_metric = "mae"
    accepts_structures = True

    def __init__(self, cfg: Config, state: dict[str, Any] | None = None) -> None:
        super().__init__(cfg, state)
        from ..data.qm9 import TARGETS, target_index

        self.indices = [target_index(t) for t in cfg.data.targets]
        self.target_names = [TARGETS[i].name for i in self.indices]
        self.units = [TARGETS[i].unit for i in self.indices]

    def datasets(self) -> dict[str, Dataset | None]:
        from ..data.qm9 import NUM_MOLECULES, QM9, conventional_split

        d = self.cfg.data
        dataset = QM9(
            str(d.path),
            source=d.source,
            target=list(self.indices),
            max_molecules=d.max_molecules,
            log=False,
        )
        n = len(dataset)
        if n == NUM_MOLECULES:
            train, valid, test = conventional_split(n, seed=d.split_seed)
        else:
            n_train, n_valid, _ = _split_sizes(n, None, None)
            train, valid, test = conventional_split(
                n, seed=d.split_seed, num_train=n_train, num_valid=n_valid
            )
        return {
            "train": dataset[_first(train, d.train_size, "data.train_size")],
            "valid": dataset[_first(valid, d.valid_size, "data.valid_size")],
            "test": dataset[_first(test, d.test_size, "data.test_size")],
        }

    def check_item(self, item: Data) -> str | None:
        """QM9 holds H, C, N, O and F only: other elements were never seen in training."""
        other = sorted(set(item.z.tolist()) - QM9_ELEMENTS)
        if other:
            from ase.data import chemical_symbols

            names = ", ".join(
                chemical_symbols[z] if z < len(chemical_symbols) else str(z) for z in other
            )
            return f"elements outside QM9 (H, C, N, O, F): {names}"
        return None

    def _atom_refs(self) -> Tensor | None:
        """``[10, t]`` atom reference energies (eV) by atomic number, zero for targets
        without references; ``None`` when no target has them."""
        from ..data.qm9 import atom_refs

        columns, any_ref = [], False
        for index in self.indices:
            if 7 <= index <= 10:
                columns.append(atom_refs(index).float())
                any_ref = True
            else:
                columns.append(torch.zeros(10))
        return torch.stack(columns, dim=1) if any_ref else None

    def fit_state(self, train: Dataset) -> None:
        y = _stack_field(train, "y").double().reshape(-1, len(self.indices))  # [g, t]
        refs = self._atom_refs()
        if refs is not None:  # standardise what the network predicts: E - sum of references
            z, counts = _concat_field(train, "z")
            graph = torch.repeat_interleave(torch.arange(len(counts)), counts)
            per_graph = torch.zeros(len(counts), refs.shape[1], dtype=torch.float64)
            per_graph.index_add_(0, graph, refs.double()[z])
            y = y - per_graph
        std = y.std(0) if len(y) > 1 else torch.ones(y.shape[1], dtype=torch.float64)
        std = torch.where(std > 0, std, torch.ones_like(std))
        self.state = {
            "targets": list(self.target_names),
            "units": list(self.units),
            "mean": y.mean(0).float(),
            "std": std.float(),
            "atom_refs": refs,
        }

    def model_kwargs(self) -> dict[str, Any]:
        kwargs = {
            "num_targets": len(self.indices),
            "target_mean": self.state["mean"].clone(),
            "target_std": self.state["std"].clone(),
        }
        if self.state.get("atom_refs") is not None:
            kwargs["atom_refs"] = self.state["atom_refs"].clone()
        return kwargs

    @property
    def metric_names(self) -> list[str]:
        names = ["loss", "mae"]
        if len(self.indices) > 1:
            names += [f"mae_{t}" for t in self.target_names]
        return names

    def metric_unit(self, metric: str) -> str:
        if metric == "mae":
            return self.units[0] if len(self.units) == 1 else ""
        if metric.startswith("mae_"):
            return self.units[self.target_names.index(metric[4:])]
        return ""

    def _residual(self, out: dict[str, Tensor], batch: Batch) -> Tensor:
        pred = out["y"].float().reshape(-1, len(self.indices))  # [g, t]
        y = batch.y.float().reshape(-1, len(self.indices))
        return pred - y

    def loss(self, out: dict[str, Tensor], batch: Batch) -> Tensor:
        std = self.state["std"].to(out["y"].device)
        residual = self._residual(out, batch) / std  # [g, t]
        count = self.item_count(residual.numel(), residual.device)
        return _regression_loss(self.cfg.train.loss, residual, count)

    def batch_stats(self, out: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        residual = self._residual(out, batch).double()
        std = self.state["std"].to(residual.device).double()
        loss = _regression_loss(self.cfg.train.loss, residual / std)
        return {
            "count": torch.tensor(float(len(residual)), dtype=torch.float64),
            "loss": loss.detach() * len(residual),
            "abs": residual.abs().sum(0).detach(),  # [t]
        }

    def compute_metrics(self, sums: dict[str, Tensor]) -> dict[str, float]:
        count = max(float(sums["count"]), 1.0)
        mae = sums["abs"] / count  # [t], target units
        out = {"loss": float(sums["loss"]) / count}
        if len(self.indices) == 1:
            out["mae"] = float(mae[0])
        else:
            out["mae"] = float((mae / self.state["std"].double()).mean())
            out.update({f"mae_{t}": float(m) for t, m in zip(self.target_names, mae, strict=True)})
        return out

    def prediction_columns(self) -> list[str]:
        columns = []
        for name, unit in zip(self.target_names, self.units, strict=True):
            columns += [f"{name}_pred_{unit}", f"{name}_true_{unit}"]
        return columns

    def prediction_rows(self, out: dict[str, Tensor], batch: Batch) -> list[dict[str, Any]]:
        pred = out["y"].detach().float().reshape(-1, len(self.indices)).cpu()
        y = getattr(batch, "y", None)
        y = y.float().reshape(-1, len(self.indices)).cpu() if y is not None else None
        rows = []
        for g in range(len(pred)):
            row = {}
            for t, (name, unit) in enumerate(zip(self.target_names, self.units, strict=True)):
                row[f"{name}_pred_{unit}"] = float(pred[g, t])
                if y is not None:
                    row[f"{name}_true_{unit}"] = float(y[g, t])
            rows.append(row)
        return rows


def _stack_field(dataset: Dataset, key: str) -> Tensor:
    """One graph-level field of every item, concatenated (fast path for in-memory data)."""
    fast = _in_memory_field(dataset, key)
    if fast is not None:
        return fast[0]
    return torch.cat([torch.as_tensor(dataset[i][key]).reshape(1, -1) for i in range(len(dataset))])


def _concat_field(dataset: Dataset, key: str) -> tuple[Tensor, Tensor]:
    """A node-level field of every item concatenated, and the node count of each item."""
    fast = _in_memory_field(dataset, key)
    if fast is not None:
        return fast
    parts = [dataset[i][key] for i in range(len(dataset))]
    return torch.cat(parts), torch.tensor([len(p) for p in parts])


def _in_memory_field(dataset: Dataset, key: str) -> tuple[Tensor, Tensor] | None:
    """``(values, counts)`` of a field of a PyG ``InMemoryDataset`` (or an index subset of
    one) straight from its storage, without building one ``Data`` per item."""
    from torch_geometric.data import InMemoryDataset

    if not isinstance(dataset, InMemoryDataset) or dataset.transform is not None:
        return None
    slices = dataset.slices
    if slices is None or key not in slices:
        return None
    ptr = slices[key]
    values = dataset._data[key]
    items = dataset.indices()
    items = torch.as_tensor(list(items) if not isinstance(items, Tensor) else items)
    starts, stops = ptr[items], ptr[items + 1]
    counts = stops - starts
    index = torch.repeat_interleave(starts - torch.cumsum(counts, 0) + counts, counts)
    index = index + torch.arange(int(counts.sum()))
    return values[index], counts


# ----------------------------------------------------------------------------------- OC20
class _OC20Task(Task):
    """Shared OC20 data handling: ``data.path`` (+ ``valid_path``/``test_path``) or a random
    split of ``data.path``. ``data.options.make_synthetic: n`` first writes ``n`` simulated
    systems (:func:`geolinrpe.data.oc20.make_synthetic`: EMT slab + adsorbate relaxations) to
    ``data.path`` when it does not exist; ``data.options.make_molten_salt: {structures: n,
    atoms: a}`` (S2EF) writes ``n`` Na/Cl Ewald boxes of ``a`` ions
    (:func:`geolinrpe.data.molten_salt.make_molten_salt`) instead."""

    position_unit = "Å"

    accepts_structures = True
    oc20_task: ClassVar[str]

    def datasets(self) -> dict[str, Dataset | None]:
        from ..data.oc20 import OC20

        d = self.cfg.data
        safe = bool(d.options.get("safe", True))
        synthetic = d.options.get("make_synthetic")
        molten = d.options.get("make_molten_salt")
        if molten is not None and not Path(str(d.path)).exists():
            from ..data.molten_salt import make_molten_salt

            keys = {"structures", "atoms"}
            if self.oc20_task != "s2ef" or not isinstance(molten, dict) or set(molten) != keys:
                raise ValueError(
                    "config key 'data.options.make_molten_salt' must be {structures: n, atoms: a} "
                    f"with task oc20-s2ef, got {molten!r} with task {self.name!r}"
                )
            make_molten_salt(
                str(d.path), int(molten["structures"]), int(molten["atoms"]), seed=d.split_seed
            )
        elif synthetic is not None and not Path(str(d.path)).exists():
            from ..data.oc20 import make_synthetic

            fmt = "lmdb-is2re" if self.oc20_task == "is2re" else "lmdb-s2ef"
            make_synthetic(str(d.path), int(synthetic), format=fmt, seed=d.split_seed)
        train = OC20(str(d.path), task=self.oc20_task, safe=safe)
        if d.valid_path is not None:
            valid = OC20(str(d.valid_path), task=self.oc20_task, safe=safe)
            test = (
                OC20(str(d.test_path), task=self.oc20_task, safe=safe)
                if d.test_path is not None
                else None
            )
            parts = {"train": train, "valid": valid, "test": test}
            train_idx = torch.arange(len(train))
            parts["train"] = Subset(train, _first(train_idx, d.train_size, "data.train_size"))
            for split, key in (("valid", "data.valid_size"), ("test", "data.test_size")):
                if parts[split] is not None:
                    size = d.valid_size if split == "valid" else d.test_size
                    idx = torch.arange(len(parts[split]))
                    parts[split] = Subset(parts[split], _first(idx, size, key))
            return parts
        tr, va, te = _random_split(len(train), d.split_seed, d.valid_size, d.test_size)
        return {
            "train": Subset(train, _first(tr, d.train_size, "data.train_size").tolist()),
            "valid": Subset(train, va.tolist()),
            "test": Subset(train, te.tolist()),
        }

    def _energies(self, train: Dataset, key: str) -> Tensor:
        n = len(train)
        step = max(1, n // 20_000)  # at most ~20k records for the statistics
        return torch.cat([train[i][key].reshape(-1) for i in range(0, n, step)]).double()

    def _energy_state(self, energies: Tensor) -> None:
        std = energies.std() if len(energies) > 1 else torch.tensor(1.0, dtype=torch.float64)
        std = std if std > 0 else torch.tensor(1.0, dtype=torch.float64)
        self.state = {"mean": energies.mean().reshape(1).float(), "std": std.reshape(1).float()}

    def model_kwargs(self) -> dict[str, Any]:
        return {
            "num_targets": 1,
            "target_mean": self.state["mean"].clone(),
            "target_std": self.state["std"].clone(),
        }

    def metric_unit(self, metric: str) -> str:
        return {"energy_mae": "eV", "forces_mae": "eV/A"}.get(metric, "")


class OC20IS2RETask(_OC20Task):
    """OC20 IS2RE: the relaxed adsorption energy ``y_relaxed`` (eV) from the initial
    structure. Metric ``energy_mae`` (eV)."""

    name = "oc20-is2re"
    oc20_task = "is2re"
    main_metric = "energy_mae"

    def fit_state(self, train: Dataset) -> None:
        self._energy_state(self._energies(train, "y_relaxed"))

    def _residual(self, out: dict[str, Tensor], batch: Batch) -> Tensor:
        return out["y"].float().reshape(-1) - batch.y_relaxed.float().reshape(-1)

    def loss(self, out: dict[str, Tensor], batch: Batch) -> Tensor:
        residual = self._residual(out, batch) / self.state["std"].to(out["y"].device)  # [g]
        count = self.item_count(residual.numel(), residual.device)
        return _regression_loss(self.cfg.train.loss, residual, count)

    def batch_stats(self, out: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        residual = self._residual(out, batch).double().detach()
        std = float(self.state["std"])
        return {
            "count": torch.tensor(float(len(residual)), dtype=torch.float64),
            "loss": _regression_loss(self.cfg.train.loss, residual / std) * len(residual),
            "abs": residual.abs().sum(),
        }

    def compute_metrics(self, sums: dict[str, Tensor]) -> dict[str, float]:
        count = max(float(sums["count"]), 1.0)
        return {"loss": float(sums["loss"]) / count, "energy_mae": float(sums["abs"]) / count}

    def prediction_columns(self) -> list[str]:
        return ["energy_pred_eV", "energy_true_eV"]

    def prediction_rows(self, out: dict[str, Tensor], batch: Batch) -> list[dict[str, Any]]:
        pred = out["y"].detach().float().reshape(-1).cpu()
        true = getattr(batch, "y_relaxed", None)
        rows = [{"energy_pred_eV": float(p)} for p in pred]
        if true is not None:
            for row, t in zip(rows, true.reshape(-1).tolist(), strict=True):
                row["energy_true_eV"] = t
        return rows


class OC20S2EFTask(_OC20Task):
    """OC20 S2EF: the energy ``y`` (eV) and forces ``force`` (eV/A) of a structure; the
    model predicts the energy and its negative gradient (``model.options.predict_forces``).

    Loss: ``energy_weight * loss((E - y) / std) + force_weight * loss((F - f) / std)``;
    metrics ``forces_mae`` (eV/A, over force components) and ``energy_mae`` (eV)."""

    name = "oc20-s2ef"
    oc20_task = "s2ef"
    main_metric = "forces_mae"
    needs_grad = True

    def fit_state(self, train: Dataset) -> None:
        self._energy_state(self._energies(train, "y"))

    def model_kwargs(self) -> dict[str, Any]:
        return {**super().model_kwargs(), "predict_forces": True}

    @property
    def metric_names(self) -> list[str]:
        return ["loss", "forces_mae", "energy_mae"]

    def _residuals(self, out: dict[str, Tensor], batch: Batch) -> tuple[Tensor, Tensor]:
        energy = out["energy"].float().reshape(-1) - batch.y.float().reshape(-1)  # [g]
        forces = out["forces"].float() - batch.force.float()  # [n, 3]
        return energy, forces

    def loss(self, out: dict[str, Tensor], batch: Batch) -> Tensor:
        """Energy term: mean over graphs (this process's, the same number in every process
        with ``data.balance: graphs``; the global batch's with ``atoms``,
        :meth:`Task.item_count`); force term: mean over all force components of the global
        batch (:meth:`Task.shard_count`)."""
        energy, forces = self._residuals(out, batch)
        std = self.state["std"].to(energy.device, energy.dtype)
        count = self.shard_count(torch.tensor(float(forces.numel()), device=forces.device))
        graphs = self.item_count(energy.numel(), energy.device)
        t = self.cfg.train
        return t.energy_weight * _regression_loss(
            t.loss, energy / std, graphs
        ) + t.force_weight * _regression_loss(t.loss, forces / std, count)

    def batch_stats(self, out: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        energy, forces = (r.detach().double() for r in self._residuals(out, batch))
        std = self.state["std"].to(energy.device, energy.dtype)
        kind = self.cfg.train.loss
        return {  # sums, so that the loss is the split's mean whatever the batching
            "count": torch.tensor(float(len(energy)), dtype=torch.float64),
            "energy_loss": _regression_loss(kind, energy / std, 1.0),
            "force_loss": _regression_loss(kind, forces / std, 1.0),
            "energy_abs": energy.abs().sum(),
            "force_abs": forces.abs().sum(),
            "force_count": torch.tensor(float(forces.numel()), dtype=torch.float64),
        }

    def compute_metrics(self, sums: dict[str, Tensor]) -> dict[str, float]:
        count = max(float(sums["count"]), 1.0)
        force_count = max(float(sums["force_count"]), 1.0)
        t = self.cfg.train
        return {
            "loss": t.energy_weight * float(sums["energy_loss"]) / count
            + t.force_weight * float(sums["force_loss"]) / force_count,
            "forces_mae": float(sums["force_abs"]) / force_count,
            "energy_mae": float(sums["energy_abs"]) / count,
        }

    def prediction_columns(self) -> list[str]:
        return ["energy_pred_eV", "energy_true_eV", "forces_mae_eV/A"]

    def prediction_rows(self, out: dict[str, Tensor], batch: Batch) -> list[dict[str, Any]]:
        pred = out["energy"].detach().float().reshape(-1).cpu()
        rows = [{"energy_pred_eV": float(p)} for p in pred]
        if getattr(batch, "y", None) is not None and getattr(batch, "force", None) is not None:
            err = (out["forces"].detach().float() - batch.force.float()).abs().mean(-1).cpu()
            per_graph = torch.zeros(len(pred)).index_add_(0, batch.batch.cpu(), err)
            counts = torch.bincount(batch.batch.cpu(), minlength=len(pred)).clamp(min=1)
            for g, row in enumerate(rows):
                row["energy_true_eV"] = float(batch.y.reshape(-1)[g])
                row["forces_mae_eV/A"] = float(per_graph[g] / counts[g])
        return rows


# --------------------------------------------------------------------- classification
class ClassificationTask(Task):
    """Graph classification with cross-entropy; metrics ``accuracy`` and ``loss`` (nats)."""

    main_metric = "accuracy"
    higher_is_better = True

    @property
    def num_classes(self) -> int:
        """Classes, from the fitted state."""
        return int(self.state["num_classes"])

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}

    def loss(self, out: dict[str, Tensor], batch: Batch) -> Tensor:
        y = batch.y.reshape(-1)
        count = self.item_count(y.numel(), y.device)
        if count is None:
            return F.cross_entropy(out["y"].float(), y)
        return F.cross_entropy(out["y"].float(), y, reduction="sum") / count

    def batch_stats(self, out: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        logits, y = out["y"].detach().float(), batch.y.reshape(-1)
        return {
            "count": torch.tensor(float(len(y)), dtype=torch.float64),
            "loss": F.cross_entropy(logits, y, reduction="sum").double(),
            "correct": (logits.argmax(-1) == y).sum().double(),
        }

    def compute_metrics(self, sums: dict[str, Tensor]) -> dict[str, float]:
        count = max(float(sums["count"]), 1.0)
        return {"loss": float(sums["loss"]) / count, "accuracy": float(sums["correct"]) / count}

    def prediction_columns(self) -> list[str]:
        return ["pred_class", "pred_label", "probability", "true_class"]

    def prediction_rows(self, out: dict[str, Tensor], batch: Batch) -> list[dict[str, Any]]:
        prob = out["y"].detach().float().softmax(-1).cpu()
        best, cls = prob.max(-1)
        names = self.state.get("class_names")
        rows = []
        for g in range(len(cls)):
            row = {"pred_class": int(cls[g]), "probability": float(best[g])}
            if names:
                row["pred_label"] = names[int(cls[g])]
            if getattr(batch, "y", None) is not None:
                row["true_class"] = int(batch.y.reshape(-1)[g])
            rows.append(row)
        return rows


class PointCloudTask(ClassificationTask):
    """Shape classification on :class:`~geolinrpe.data.SyntheticShapes` (noisy, randomly
    rotated clouds). ``data.options``: ``num_classes`` (8-12, default 10), ``num_points``
    (default 256), ``noise`` (0.01), ``rotate`` (true); ``data.train_size`` (default 1000),
    ``valid_size``/``test_size`` (200) samples, generated from ``data.split_seed``."""

    name = "point-cloud"

    def _make(self, num_samples: int, seed: int) -> Dataset:
        from ..data import SyntheticShapes

        o = self.cfg.data.options
        return SyntheticShapes(
            num_classes=int(o.get("num_classes", 10)),
            num_points=int(o.get("num_points", 256)),
            num_samples=num_samples,
            noise=float(o.get("noise", 0.01)),
            rotate=bool(o.get("rotate", True)),
            seed=seed,
        )

    def datasets(self) -> dict[str, Dataset | None]:
        d = self.cfg.data
        seed = d.split_seed
        return {
            "train": self._make(d.train_size or 1000, seed),
            "valid": self._make(d.valid_size or 200, seed + 1),
            "test": self._make(d.test_size or 200, seed + 2),
        }

    def fit_state(self, train: Dataset) -> None:
        base = train.dataset if isinstance(train, Subset) else train
        self.state = {"num_classes": base.num_classes, "class_names": list(base.classes)}


class PatchTask(ClassificationTask):
    """Digit classification on scikit-learn's 8x8 digits as patch tokens (positions are
    the patches' (row, column)). ``data.options.patch_size`` (default 2); a seeded random
    split of the 1,797 images (``valid_size``/``test_size`` default 10 % each)."""

    position_unit = "patches"

    name = "patch"

    def datasets(self) -> dict[str, Dataset | None]:
        from ..data import load_digits_patches

        d = self.cfg.data
        dataset = load_digits_patches(patch_size=int(d.options.get("patch_size", 2)))
        train, valid, test = _random_split(len(dataset), d.split_seed, d.valid_size, d.test_size)
        return {
            "train": Subset(dataset, _first(train, d.train_size, "data.train_size").tolist()),
            "valid": Subset(dataset, valid.tolist()),
            "test": Subset(dataset, test.tolist()),
        }

    def fit_state(self, train: Dataset) -> None:
        self.state = {
            "num_classes": 10,
            "class_names": [str(i) for i in range(10)],
            "in_channels": int(train[0].x.shape[-1]),
        }

    def model_kwargs(self) -> dict[str, Any]:
        return {**super().model_kwargs(), "in_channels": int(self.state["in_channels"])}


# ----------------------------------------------------------------------------- sequence
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")


def read_text(path: str | Path) -> str:
    """A text file, or every ``*.txt``/``*.md``/``*.rst``/``*.py`` file under a folder (in
    sorted path order) joined by newlines."""
    path = Path(path)
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise ValueError(f"config key 'data.path': {str(path)!r} holds no {TEXT_SUFFIXES} files")
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


class CharacterSequences(Dataset):
    """Non-overlapping windows of a character stream as next-character examples.

    Item ``i`` is a ``Data`` with ``x [L]`` long (characters ``iL .. iL+L-1``) and ``y [L]``
    long (the next character of each); the model places token ``t`` at position ``t``.

    Args:
        tokens: the encoded stream ``[N]`` (long).
        seq_len: ``L``.
    """

    def __init__(self, tokens: Tensor, seq_len: int) -> None:
        if len(tokens) < seq_len + 1:
            raise ValueError(f"{len(tokens)} characters are too few for seq_len={seq_len}")
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> Data:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} sequences")
        chunk = self.tokens[i * self.seq_len : (i + 1) * self.seq_len + 1]
        return Data(x=chunk[:-1], y=chunk[1:], num_nodes=self.seq_len)


class SequenceTask(Task):
    """Character-level language modelling (causal) on local text (``data.path``: a file or
    a folder of text/source files). The vocabulary is the training text's characters plus
    ``<unk>`` (index 0). The stream is cut into windows of ``data.options.seq_len``
    (default 64); the last ``valid_size`` and ``test_size`` windows (default 5 % each) are
    the validation and test splits. Metrics ``perplexity`` (per character) and ``loss``
    (nats per character)."""

    position_unit = "tokens"

    name = "sequence"
    main_metric = "perplexity"

    def _windows(self) -> tuple[str, int, int, int]:
        """The text, the window length and the validation and test window counts."""
        d = self.cfg.data
        text = read_text(str(d.path))
        seq_len = int(d.options.get("seq_len", 64))
        total = (len(text) - 1) // seq_len
        valid = d.valid_size if d.valid_size is not None else max(1, total // 20)
        test = d.test_size if d.test_size is not None else max(1, total // 20)
        if valid + test >= total:
            raise ValueError(
                f"config key 'data.path': {total} windows of {seq_len} characters leave no "
                f"training text after {valid} validation and {test} test windows"
            )
        return text, seq_len, valid, test

    def datasets(self) -> dict[str, Dataset | None]:
        text, seq_len, valid, test = self._windows()
        n_train = (len(text) - 1) // seq_len - valid - test
        if "vocab" not in self.state:
            self.state = {"vocab": "".join(sorted(set(text[: n_train * seq_len + 1])))}
        tokens = self.encode(text)
        stream = CharacterSequences(tokens, seq_len)
        idx = torch.arange(len(stream))
        d = self.cfg.data
        return {
            "train": Subset(stream, _first(idx[:n_train], d.train_size, "data.train_size")),
            "valid": Subset(stream, idx[n_train : n_train + valid].tolist()),
            "test": Subset(stream, idx[n_train + valid : n_train + valid + test].tolist()),
        }

    def encode(self, text: str) -> Tensor:
        """Characters -> ids (``0`` for characters outside the vocabulary)."""
        table = {ch: i + 1 for i, ch in enumerate(self.state["vocab"])}
        return torch.tensor([table.get(ch, 0) for ch in text], dtype=torch.long)

    def decode(self, ids: Tensor) -> str:
        """Ids -> characters (``\\ufffd`` for ``<unk>``)."""
        vocab = "\ufffd" + self.state["vocab"]
        return "".join(vocab[int(i)] for i in ids)

    def model_kwargs(self) -> dict[str, Any]:
        return {
            "vocab_size": len(self.state["vocab"]) + 1,
            "max_len": int(self.cfg.data.options.get("seq_len", 64)),
        }

    def forward(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        """The model reads dense tokens ``[g, L]`` (all windows have length L) and returns
        logits ``[g, L, c]``; flattened to ``[g * L, c]`` to match ``batch.y``."""
        tokens = batch.x.view(batch.num_graphs, -1)
        logits = model(tokens)
        return {"y": logits.reshape(-1, logits.shape[-1])}

    @property
    def metric_names(self) -> list[str]:
        return ["loss", "perplexity", "accuracy"]

    def loss(self, out: dict[str, Tensor], batch: Batch) -> Tensor:
        y = batch.y.reshape(-1)
        count = self.item_count(y.numel(), y.device)
        if count is None:
            return F.cross_entropy(out["y"].float(), y)
        return F.cross_entropy(out["y"].float(), y, reduction="sum") / count

    def batch_stats(self, out: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        logits, y = out["y"].detach().float(), batch.y.reshape(-1)
        return {
            "count": torch.tensor(float(len(y)), dtype=torch.float64),
            "loss": F.cross_entropy(logits, y, reduction="sum").double(),
            "correct": (logits.argmax(-1) == y).sum().double(),
        }

    def compute_metrics(self, sums: dict[str, Tensor]) -> dict[str, float]:
        count = max(float(sums["count"]), 1.0)
        loss = float(sums["loss"]) / count
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "accuracy": float(sums["correct"]) / count,
        }

    def prediction_columns(self) -> list[str]:
        return ["perplexity", "accuracy", "text", "predicted"]

    def prediction_rows(self, out: dict[str, Tensor], batch: Batch) -> list[dict[str, Any]]:
        logits = out["y"].detach().float().cpu()
        y, graph = batch.y.reshape(-1).cpu(), batch.batch.cpu()
        nll = F.cross_entropy(logits, y, reduction="none")
        pred = logits.argmax(-1)
        rows = []
        for g in range(int(graph.max()) + 1 if len(graph) else 0):
            sel = graph == g
            rows.append(
                {
                    "perplexity": math.exp(float(nll[sel].mean())),
                    "accuracy": float((pred[sel] == y[sel]).float().mean()),
                    "text": self.decode(batch.x.reshape(-1)[sel.to(batch.x.device)].cpu()),
                    "predicted": self.decode(pred[sel]),
                }
            )
        return rows


TASKS: dict[str, type[Task]] = {
    task.name: task
    for task in (QM9Task, OC20IS2RETask, OC20S2EFTask, PointCloudTask, PatchTask, SequenceTask)
}
"""``data.task`` name -> task class."""


def build_task(cfg: Config, state: dict[str, Any] | None = None) -> Task:
    """The task of ``cfg.data.task`` (with checkpointed ``state`` when reloading a model)."""
    if cfg.data.task not in TASKS:
        raise ValueError(f"config key 'data.task': unknown task {cfg.data.task!r}")
    return TASKS[cfg.data.task](cfg, state)
