"""Softmax and log-softmax with float32 accumulation for low-precision inputs."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent._kernels import compute_dtype
from jxent._validation import as_float_array, check_class_mask, normalize_axis

Axes = int | tuple[int, ...]


@functools.partial(jax.jit, static_argnames=("axis",))
def _log_softmax(x: jax.Array, axis: Axes, where: jax.Array | None) -> jax.Array:
    z = x.astype(compute_dtype(x.dtype))
    return jax.nn.log_softmax(z, axis=axis, where=where).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("axis",))
def _softmax(x: jax.Array, axis: Axes, where: jax.Array | None) -> jax.Array:
    z = x.astype(compute_dtype(x.dtype))
    return jax.nn.softmax(z, axis=axis, where=where).astype(x.dtype)


def _normalized_axes(axis: int | Sequence[int] | None, ndim: int) -> Axes:
    """One axis, or a tuple of distinct axes (None: all), as non-negative ints."""
    if axis is None or isinstance(axis, (tuple, list)):
        axes = range(ndim) if axis is None else axis
        axes = tuple(normalize_axis(a, ndim, "x") for a in axes)
        if len(set(axes)) != len(axes) or not axes:
            raise ValueError(
                f"`axis` must name distinct axes of `x` (rank {ndim}), got {axis!r}."
            )
        return axes
    return normalize_axis(axis, ndim, "x")


def _checked(x: ArrayLike, axis: int | Sequence[int] | None, where: ArrayLike | None):
    """``x`` as a float array of rank >= 1, its normalised axes and mask.

    A 0-d ``x`` is one class along axis 0 (or -1), as in ``torch.softmax``:
    it is computed as a length-1 vector (callers restore the shape).
    """
    x = as_float_array(x, "x")
    if x.ndim == 0:
        if axis not in (0, -1, None, (0,), (-1,), [0], [-1]):
            raise ValueError(
                f"`axis` must be 0, -1 or None for a 0-d `x` (a single class, as "
                f"in torch.softmax), got {axis!r}."
            )
        x = x.reshape(1)
    axis = _normalized_axes(axis, x.ndim)
    # A length-C mask lies along a single class axis (an int or a 1-tuple);
    # over several, NumPy's broadcasting (as jax.nn's).
    single = axis if isinstance(axis, int) else axis[0] if len(axis) == 1 else None
    mask_axis = x.ndim - 1 if single is None else single
    return x, axis, check_class_mask(where, x.shape, mask_axis)


def log_softmax(
    x: ArrayLike,
    axis: int | Sequence[int] | None = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Log-softmax over the class axis: ``x - logsumexp(x)``.

    Computes ``log_softmax(x)_c = x_c - log Σ_k exp(x_k)`` with the maximum
    subtracted first, so large logits do not overflow. bfloat16 and float16
    inputs are computed in float32 and returned in their own dtype (torch's
    ``F.log_softmax`` semantics; ``jax.nn.log_softmax`` computes in the input
    dtype). A ``-inf`` logit gives ``-inf`` with a zero gradient.

    Args:
      x: floating array of logits. A 0-d one is a single class, as in
        ``torch.log_softmax``: its log-softmax is 0 (NaN for a NaN or
        infinite logit).
      axis: the class axis (``1`` for PyTorch's ``(N, C, d1, ...)`` layout),
        or, as in ``jax.nn.log_softmax``, a tuple of axes normalised over
        together (``None``: all of them).
      where: optional boolean mask of the classes to include, broadcast to
        ``x`` (a length-C mask lies along ``axis``), as in
        ``jax.nn.log_softmax``: excluded classes leave the sum and their
        output is ``-inf``, with zero gradient.

    Returns:
      An array of the shape and dtype of ``x``.

    Raises:
      TypeError: if ``x`` is not floating or ``where`` not boolean.
      ValueError: if an axis is out of range or repeated, or ``where`` does not
        broadcast.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> jxent.log_softmax(jnp.array([2.8883, 0.1760, 1.0774]))
      Array([-0.2069..., -2.9192..., -2.0178...], dtype=float32)
      >>> jxent.log_softmax(jnp.array([2.8883, 0.1760, 1.0774]),
      ...                   where=jnp.array([True, False, True]))
      Array([-0.1514...,        -inf, -1.9623...], dtype=float32)
    """
    return _log_softmax(*_checked(x, axis, where)).reshape(jnp.shape(x))


def softmax(
    x: ArrayLike,
    axis: int | Sequence[int] | None = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Softmax over the class axis: ``exp(x_c) / Σ_k exp(x_k)``.

    Computed stably (maximum subtracted) with float32 accumulation for
    bfloat16 and float16 inputs; the result has the input's dtype.

    Args:
      x: floating array of logits. A 0-d one is a single class, as in
        ``torch.softmax``: its softmax is 1 (NaN for a NaN or infinite logit).
      axis: the class axis, or a tuple of axes normalised over together
        (``None``: all of them), as in ``jax.nn.softmax``.
      where: optional boolean mask of the classes to include, broadcast to
        ``x`` (a length-C mask lies along ``axis``), as in ``jax.nn.softmax``:
        excluded classes leave the sum and their output is 0.

    Returns:
      An array of the shape and dtype of ``x`` whose entries along ``axis`` sum
      to one.

    Raises:
      TypeError: if ``x`` is not floating or ``where`` not boolean.
      ValueError: if an axis is out of range or repeated, or ``where`` does not
        broadcast.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> jxent.softmax(jnp.array([2.8883, 0.1760, 1.0774]))
      Array([0.8131..., 0.0540..., 0.1329...], dtype=float32)
    """
    return _softmax(*_checked(x, axis, where)).reshape(jnp.shape(x))
