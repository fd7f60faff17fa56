"""A matmul whose reverse mode rounds the cotangent to the weights' dtype.

``rounded_transpose_dot(t, w)`` is ``t @ w`` (leading batch dimensions
shared): ``t`` float32 (the tangent of a tile's hidden states), ``w`` 16-bit
(a class block of the LM head), the product exact in ``t``'s dtype. It is
linear in each operand, and its transpose w.r.t. ``t`` is ``round(ct) @
w^T`` with the cotangent rounded to ``w``'s dtype and the product
accumulated in ``t``'s: one matmul of 16-bit operands with float32 results.
JAX's own transpose of ``t @ w`` multiplies the float32 cotangent by ``w``,
which XLA lowers to a float32 matmul of a float32 copy of ``w`` (on a 2-core
AMD EPYC with ``avx512_bf16`` 176 GFLOP/s against 322 at (1024, 8192) x
(8192, 1024)); a cotangent already rounded but still float32 is lowered the
same way (169). ``jax.custom_vjp`` cannot be transposed and
``jax.custom_derivatives.linear_call`` has no batching rule, so this is a
primitive: its implementation, lowering, JVP (bilinear, through itself, so
higher orders round the same way), transposes and batching rule are below.

The rounding is the one the naive bfloat16 program makes (its gradient
w.r.t. the logits is bfloat16) and ``linear_cross_entropy``'s own
``c.astype(w.dtype)`` before its ``dx`` matmul; the transpose w.r.t. ``w``
(second order) is exact.
"""

from __future__ import annotations

import jax
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jxent._sharding import vary_like

_rounded_transpose_dot_p = Primitive("jxent_rounded_transpose_dot")


def rounded_transpose_dot(t: jax.Array, w: jax.Array) -> jax.Array:
    """``t @ w`` whose transpose w.r.t. ``t`` rounds the cotangent to ``w``'s dtype.

    Args:
      t: ``(..., n, d)`` floating array, the product's dtype.
      w: ``(..., d, v)`` floating array with the same leading dimensions.

    Returns:
      ``(..., n, v)``: ``t @ w`` in ``t``'s dtype.
    """
    if t.ndim != w.ndim or t.ndim < 2 or t.shape[:-2] != w.shape[:-2]:
        raise ValueError(
            f"rounded_transpose_dot: t of shape {t.shape} and w of shape "
            f"{w.shape} need the same leading dimensions and rank >= 2"
        )
    if t.shape[-1] != w.shape[-2]:
        raise ValueError(
            f"rounded_transpose_dot: t's last dimension ({t.shape[-1]}) must "
            f"equal w's second-to-last ({w.shape[-2]})"
        )
    # Both vary over the shard_map axes either does (dot_general's rule).
    t = vary_like(t, w)
    return _rounded_transpose_dot_p.bind(t, vary_like(w, t))


def _batch_dims(ndim: int) -> tuple[int, ...]:
    return tuple(range(ndim - 2))


def _dimension_numbers(ndim: int):
    """``t @ w``'s: ``t``'s last axis against ``w``'s second-to-last."""
    batch = _batch_dims(ndim)
    return ((ndim - 1,), (ndim - 2,)), (batch, batch)


def _product(t, w):
    return lax.dot_general(t, w.astype(t.dtype), _dimension_numbers(t.ndim))


_rounded_transpose_dot_p.def_impl(_product)
mlir.register_lowering(
    _rounded_transpose_dot_p, mlir.lower_fun(_product, multiple_results=False)
)


@_rounded_transpose_dot_p.def_abstract_eval
def _abstract_eval(t, w):
    """``dot_general``'s: shape, sharding and varying manual axes."""
    out, _ = lax.dot_general_p.abstract_eval(
        t,
        w,
        dimension_numbers=_dimension_numbers(t.ndim),
        precision=None,
        preferred_element_type=t.dtype,
        out_sharding=None,
    )
    return out


def _transpose_t(ct, t, w):
    """``round(ct) @ w^T``, accumulated in ``t``'s dtype."""
    batch = _batch_dims(w.ndim)
    last = w.ndim - 1
    return lax.dot_general(
        ct.astype(w.dtype),
        w,
        (((last,), (last,)), (batch, batch)),
        preferred_element_type=t.aval.dtype,
    )


def _transpose_w(ct, t, w):
    """``t^T @ ct`` in ``w``'s dtype (exact: JAX's own transpose)."""
    return jax.linear_transpose(lambda w_: _product(t, w_), w.aval)(ct)[0]


ad.defbilinear(_rounded_transpose_dot_p, _transpose_t, _transpose_w)


def _batch_rule(args, dims):
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    t, w = (batching.bdim_at_front(a, d, size) for a, d in zip(args, dims, strict=True))
    return rounded_transpose_dot(t, w), 0


batching.primitive_batchers[_rounded_transpose_dot_p] = _batch_rule
