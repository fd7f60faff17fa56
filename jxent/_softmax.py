"""Softmax and log-softmax with float32 accumulation for low-precision inputs."""

from __future__ import annotations

import functools

import jax
from jax.typing import ArrayLike

from jxent._kernels import compute_dtype
from jxent._validation import as_float_array, normalize_axis


@functools.partial(jax.jit, static_argnames=("axis",))
def _log_softmax(x: jax.Array, axis: int) -> jax.Array:
    return jax.nn.log_softmax(x.astype(compute_dtype(x.dtype)), axis=axis).astype(
        x.dtype
    )


@functools.partial(jax.jit, static_argnames=("axis",))
def _softmax(x: jax.Array, axis: int) -> jax.Array:
    return jax.nn.softmax(x.astype(compute_dtype(x.dtype)), axis=axis).astype(x.dtype)


def log_softmax(x: ArrayLike, axis: int = -1) -> jax.Array:
    r"""Log-softmax over the class axis: ``x - logsumexp(x)``.

    Computes ``log_softmax(x)_c = x_c - log Σ_k exp(x_k)`` with the maximum
    subtracted first, so large logits do not overflow. bfloat16 and float16
    inputs are computed in float32 and returned in their own dtype (torch's
    ``F.log_softmax`` semantics; ``jax.nn.log_softmax`` computes in the input
    dtype). A ``-inf`` logit gives ``-inf`` with a zero gradient.

    Args:
      x: floating array of logits.
      axis: the class axis (``1`` for PyTorch's ``(N, C, d1, ...)`` layout).

    Returns:
      An array of the shape and dtype of ``x``.

    Raises:
      TypeError: if ``x`` is not floating.
      ValueError: if ``axis`` is out of range.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> jxent.log_softmax(jnp.array([2.8883, 0.1760, 1.0774]))
      Array([-0.2069..., -2.9192..., -2.0178...], dtype=float32)
    """
    x = as_float_array(x, "x")
    return _log_softmax(x, normalize_axis(axis, x.ndim, "x"))


def softmax(x: ArrayLike, axis: int = -1) -> jax.Array:
    r"""Softmax over the class axis: ``exp(x_c) / Σ_k exp(x_k)``.

    Computed stably (maximum subtracted) with float32 accumulation for
    bfloat16 and float16 inputs; the result has the input's dtype.

    Args:
      x: floating array of logits.
      axis: the class axis.

    Returns:
      An array of the shape and dtype of ``x`` whose entries along ``axis`` sum
      to one.

    Raises:
      TypeError: if ``x`` is not floating.
      ValueError: if ``axis`` is out of range.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> jxent.softmax(jnp.array([2.8883, 0.1760, 1.0774]))
      Array([0.8131..., 0.0540..., 0.1329...], dtype=float32)
    """
    x = as_float_array(x, "x")
    return _softmax(x, normalize_axis(axis, x.ndim, "x"))
