"""Input validation shared by the attention operators and layers.

Every check raises ``ValueError`` naming the offending argument, so that bad input never
turns into a shape error deep inside torch or into silently wrong numbers.

Checks of tensor *values* (finiteness, sortedness, graph ids) need the values on the host,
which ``torch.compile(fullgraph=True)`` and ``torch.export`` cannot trace: they run in eager
mode only (:func:`eager_checks`); checks of types, shapes, dtypes and devices always run.
"""

from __future__ import annotations

import torch
from torch import Tensor


def eager_checks() -> bool:
    """Whether value-dependent input checks should run: ``False`` while ``torch.compile`` or
    ``torch.export`` traces (they would break the graph or fail to export), ``True`` in
    eager mode."""
    return not torch.compiler.is_compiling()


def check_floating(name: str, tensor: Tensor, finite: bool = True) -> None:
    """``tensor`` is a floating tensor and, with ``finite`` (eager mode only), has no NaN or
    inf."""
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {tensor.dtype}")
    if not finite or not eager_checks():
        return
    if tensor.numel() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name} contains {bad} NaN or inf value(s)")


def check_same_device_dtype(tensors: dict[str, Tensor | None], same_dtype: bool = True) -> None:
    """All given tensors (by argument name) share one device and, with ``same_dtype``, one dtype."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "move them to one device"
            )
        if same_dtype and t.dtype != first.dtype:
            raise ValueError(
                f"{name} has dtype {t.dtype} but {first_name} has dtype {first.dtype}; "
                "cast them to one dtype"
            )


def check_batch(
    batch: Tensor, num_tokens: int, device: torch.device, allow_empty: bool = False
) -> int | None:
    """PyG-style ``batch`` vector: int ``[n]``, sorted, graph ids ``0..G-1`` without gaps.

    Returns the number of graphs ``G`` (0 for an empty ``batch`` with ``allow_empty``, which
    otherwise raises), or ``None`` while compiling, when the values are not checked.
    """
    if not isinstance(batch, Tensor):
        raise ValueError(f"batch must be a torch.Tensor, got {type(batch).__name__}")
    if batch.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"batch must be an integer tensor, got dtype {batch.dtype}")
    if batch.dim() != 1 or batch.numel() != num_tokens:
        raise ValueError(
            f"batch must have shape [{num_tokens}] (one graph id per token), "
            f"got {list(batch.shape)}"
        )
    if batch.device != device:
        raise ValueError(f"batch is on {batch.device} but the inputs are on {device}")
    if num_tokens == 0:
        if allow_empty:
            return 0
        raise ValueError("batch is empty: there are no tokens to attend over")
    if not eager_checks():
        return None
    if int(batch[0]) < 0 or bool((batch < 0).any()):
        raise ValueError("batch contains negative graph ids")
    steps = batch[1:] - batch[:-1]
    if bool((steps < 0).any()):
        raise ValueError("batch must be sorted (non-decreasing), as PyG's Batch produces it")
    if int(batch[0]) != 0 or bool((steps > 1).any()):
        raise ValueError(
            "batch has gaps: graph ids must be 0..G-1 with every id present "
            "(an empty graph has no tokens and cannot be attended)"
        )
    return int(batch[-1]) + 1


def check_key_padding_mask(mask: Tensor, batch_size: int, num_tokens: int, device) -> None:
    """Boolean ``[b, n]`` with ``True`` marking padding."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"key_padding_mask must be a bool tensor (True = padding), got {got}")
    if tuple(mask.shape) != (batch_size, num_tokens):
        raise ValueError(
            f"key_padding_mask must have shape [{batch_size}, {num_tokens}], got {list(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"key_padding_mask is on {mask.device} but the inputs are on {device}")
