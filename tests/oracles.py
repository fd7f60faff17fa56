"""Reference implementations: PyTorch in float64, plus comparison helpers."""

from __future__ import annotations

import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - CI installs torch
    torch = None
    F = None

# Largest relative deviations from the torch oracle, filled by the grid tests and
# printed at the end of the run by conftest.pytest_terminal_summary.
ORACLE_DEVIATIONS: dict[str, list[float]] = {}


def record_deviation(kind: str, actual, expected) -> float:
    """Records the normwise relative error max|a - e| / max|e| (finite entries)."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    finite = np.isfinite(e)
    if not finite.any():
        dev = 0.0
    else:
        scale = max(float(np.max(np.abs(e[finite]))), 1e-30)
        dev = float(np.max(np.abs(a[finite] - e[finite]))) / scale
    ORACLE_DEVIATIONS.setdefault(kind, []).append(dev)
    return dev


def torch_cross_entropy(
    logits,
    target,
    weight=None,
    *,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    axis=-1,
    cotangent=None,
):
    """torch F.cross_entropy in float64 on the jxent layout.

    Returns (loss, grad of <loss, cotangent> w.r.t. logits), in the jxent layout.
    """
    return _torch_loss(
        F.cross_entropy,
        logits,
        target,
        weight,
        axis,
        cotangent,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )


def torch_nll_loss(
    log_probs,
    target,
    weight=None,
    *,
    ignore_index=-100,
    reduction="mean",
    axis=-1,
    cotangent=None,
):
    """torch F.nll_loss in float64 on the jxent layout."""
    return _torch_loss(
        F.nll_loss,
        log_probs,
        target,
        weight,
        axis,
        cotangent,
        ignore_index=ignore_index,
        reduction=reduction,
    )


def _torch_loss(fn, x, target, weight, axis, cotangent, **kwargs):
    x = np.asarray(x, np.float64)
    axis = axis % x.ndim
    xt = torch.tensor(x, requires_grad=True)
    # torch wants classes at dim 1 (dim 0 for unbatched input).
    torch_dim = 0 if x.ndim == 1 else 1
    moved = xt.movedim(axis, torch_dim).contiguous()
    target = np.asarray(target)
    if np.issubdtype(target.dtype, np.floating):
        tt = (
            torch.tensor(target.astype(np.float64))
            .movedim(axis, torch_dim)
            .contiguous()
        )
    else:
        tt = torch.tensor(target.astype(np.int64))
    wt = None if weight is None else torch.tensor(np.asarray(weight, np.float64))
    loss = fn(moved, tt, wt, **kwargs)
    ct = torch.ones(()) if cotangent is None else torch.tensor(np.asarray(cotangent))
    (loss * ct.to(torch.float64)).sum().backward()
    return loss.detach().numpy(), xt.grad.numpy()
