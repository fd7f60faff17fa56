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


def reference_cross_entropy(
    logits,
    target,
    weight=None,
    *,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    soft_cap=None,
    where=None,
):
    """Straightforward jax.numpy definition (one-hot, no tricks), classes last.

    Run it under ``jax.enable_x64(True)`` with float64 inputs to use it as a
    float64 oracle for the options torch does not have.
    """
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(logits)
    num_classes = x.shape[-1]
    if soft_cap is not None:
        x = soft_cap * jnp.tanh(x / soft_cap)
    mask = (
        jnp.ones(x.shape, bool)
        if where is None
        else jnp.broadcast_to(jnp.asarray(where), x.shape)
    )
    x = jnp.where(mask, x, -jnp.inf)
    lse = jax.nn.logsumexp(x, axis=-1)
    w = jnp.ones(num_classes, x.dtype) if weight is None else jnp.asarray(weight)
    count = jnp.sum(mask, -1)
    target = jnp.asarray(target)
    valid = target != ignore_index
    safe = jnp.where(valid, target, 0)
    onehot = jax.nn.one_hot(safe, num_classes, dtype=x.dtype)
    neg_lp = jnp.where(mask, lse[..., None] - x, 0.0)
    per_class_w = jnp.where(
        onehot > 0, w[safe][..., None] * (1 - label_smoothing), 0.0
    ) + jnp.where(mask, label_smoothing / count[..., None] * w[None, :], 0.0)
    loss = jnp.sum(per_class_w * neg_lp, -1) + z_loss * lse**2
    loss = jnp.where(valid, loss, 0.0)
    denom = jnp.sum(jnp.where(valid, w[safe], 0.0))
    if reduction == "none":
        return loss, lse
    if reduction == "sum":
        return jnp.sum(loss), lse
    return jnp.where(
        denom == 0, 0.0, jnp.sum(loss) / jnp.where(denom == 0, 1, denom)
    ), lse
