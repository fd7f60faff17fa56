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


def _reduce_torch(loss, reduction):
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


def _backward(loss, reduction, cotangent):
    if reduction == "none" and cotangent is not None:
        ct = torch.tensor(np.asarray(cotangent, np.float64))
    else:
        ct = torch.ones((), dtype=torch.float64)
    (loss * ct).sum().backward()


def _grad(t):
    if t is None:
        return None
    return np.zeros(t.shape) if t.grad is None else t.grad.numpy()


def torch_binary_cross_entropy(
    probs, target, weight=None, *, pos_weight=None, reduction="mean",
    logits=False, cotangent=None,
):  # fmt: skip
    """torch ``F.binary_cross_entropy[_with_logits]`` in float64.

    Returns ``(loss, grads)`` with ``grads`` a dict of the gradients of
    ``<loss, cotangent>`` w.r.t. input, target, weight and pos_weight. torch
    does not differentiate ``weight`` or ``pos_weight``: those two come from
    torch's own defining formula (``weight · ℓ`` and ``(1 - t) · x + (1 + (pw -
    1) · t) · (log1p(exp(-|x|)) + max(-x, 0))``), whose value is checked against
    torch's kernel first.
    """

    def leaf(a):
        return None if a is None else torch.tensor(np.asarray(a, np.float64))

    x, t = leaf(probs).requires_grad_(), leaf(target).requires_grad_()
    w, pw = leaf(weight), leaf(pos_weight)
    if logits:
        loss = F.binary_cross_entropy_with_logits(
            x, t, w, pos_weight=pw, reduction=reduction
        )
    else:
        loss = F.binary_cross_entropy(x, t, w, reduction=reduction)
    _backward(loss, reduction, cotangent)
    grads = {"input": _grad(x), "target": _grad(t)}
    # weight / pos_weight: autograd through torch's defining formula.
    w2 = None if w is None else w.clone().requires_grad_()
    pw2 = None if pw is None else pw.clone().requires_grad_()
    xd, td = x.detach(), t.detach()
    if logits and pw2 is not None:
        log_weight = 1 + (pw2 - 1) * td
        softplus_neg = torch.log1p(torch.exp(-xd.abs())) + torch.clamp(-xd, min=0)
        elem = (1 - td) * xd + log_weight * softplus_neg
    elif logits:
        elem = F.binary_cross_entropy_with_logits(xd, td, reduction="none")
    else:
        elem = F.binary_cross_entropy(xd, td, reduction="none")
    if w2 is not None:
        elem = w2 * elem
    again = _reduce_torch(elem, reduction)
    np.testing.assert_allclose(
        again.detach().numpy(), loss.detach().numpy(), rtol=1e-12, atol=1e-300
    )
    if w2 is not None or pw2 is not None:
        _backward(again, reduction, cotangent)
    grads["weight"], grads["pos_weight"] = _grad(w2), _grad(pw2)
    return loss.detach().numpy(), grads


def torch_sigmoid_focal_loss(
    logits, target, *, alpha=0.25, gamma=2.0, reduction="none", cotangent=None
):
    """torchvision.ops.sigmoid_focal_loss's formula in float64 torch.

    Returns ``(loss, grad w.r.t. logits, grad w.r.t. target)``.
    """
    x = torch.tensor(np.asarray(logits, np.float64), requires_grad=True)
    t = torch.tensor(np.asarray(target, np.float64), requires_grad=True)
    p = torch.sigmoid(x)
    ce_loss = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * t + (1 - alpha) * (1 - t)
        loss = alpha_t * loss
    loss = _reduce_torch(loss, reduction)
    _backward(loss, reduction, cotangent)
    return loss.detach().numpy(), _grad(x), _grad(t)
