"""Trace-time validation shared by every public function.

Each check raises a ``ValueError`` (or ``TypeError`` for dtypes) that names the
argument, the value received and what is allowed. They look only at shapes,
dtypes and Python values, so they fire identically in eager mode and under
``jax.jit``.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection
from typing import get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jxent._kernels import along_axis
from jxent._types import Reduction

REDUCTIONS: tuple[str, ...] = get_args(Reduction)


def is_concrete(x: object) -> bool:
    """Whether ``x`` holds a value known now (not a tracer inside jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def check_reduction(reduction: str, allowed: Collection[str] = REDUCTIONS) -> None:
    """Raises unless ``reduction`` is one of ``allowed``."""
    if not isinstance(reduction, str) or reduction not in allowed:
        raise ValueError(
            f"`reduction` must be one of {tuple(allowed)}, got {reduction!r}."
        )


def as_array(value: object, name: str) -> jax.Array:
    """``jnp.asarray(value)``; a ``TypeError`` naming ``name`` if it is no array.

    A string, a dict or a ragged list is refused by ``jnp.asarray`` with a
    message that does not say which argument it was.
    """
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"`{name}` must be an array (a jax or NumPy array, a number or a "
            f"nested list of numbers), got {value!r} ({e})."
        ) from None


def as_float_array(x: ArrayLike, name: str) -> jax.Array:
    """Converts ``x`` to an array; ``TypeError`` unless its dtype is floating."""
    arr = as_array(x, name)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        # The dtype the caller passed (a NumPy int64 array, not the int32 that
        # jnp.asarray turns it into without x64).
        passed = getattr(x, "dtype", arr.dtype)
        raise TypeError(
            f"`{name}` must have a floating dtype (float16, bfloat16, float32 or "
            f"float64), got {passed}."
        )
    return arr


def promoted_dtype(a: jax.Array, a_name: str, b: jax.Array, b_name: str) -> np.dtype:
    """The dtype two arrays combine in, as ``jnp.result_type`` gives it.

    Under ``jax_numpy_dtype_promotion="strict"`` arrays of different dtypes do
    not combine: a ``TypeError`` names both arguments, as ``jnp`` would refuse
    ``a @ b``.
    """
    try:
        return jnp.result_type(a.dtype, b.dtype)
    except jax.dtypes.TypePromotionError:
        raise TypeError(
            f"`{a_name}` ({a.dtype}) and `{b_name}` ({b.dtype}) have different "
            "dtypes, which jax_numpy_dtype_promotion='strict' does not promote: "
            f"cast one to the other (e.g. `{b_name}.astype({a_name}.dtype)`), or "
            "call the loss under jax.numpy_dtype_promotion('standard')."
        ) from None


def check_axis(axis: object) -> None:
    """Raises a ``TypeError`` unless ``axis`` is an int (not a bool)."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"`axis` must be an int, got {axis!r}.")


def normalize_axis(axis: int, ndim: int, name: str = "logits") -> int:
    """Returns ``axis`` as a non-negative index into an array of rank ``ndim``."""
    check_axis(axis)
    if ndim == 0:
        raise ValueError(
            f"`{name}` must have at least one dimension (the class axis), got a scalar."
        )
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"`axis` must be in [{-ndim}, {ndim}) for `{name}` of rank {ndim}, "
            f"got {axis}."
        )
    return int(axis) % ndim


def check_has_classes(shape: tuple[int, ...], axis: int, name: str = "logits") -> None:
    """Raises unless the class axis (non-negative ``axis``) has at least one class."""
    if shape[axis] == 0:
        raise ValueError(
            f"`{name}` must have at least one class on axis {axis}, got "
            f"{name}.shape={tuple(shape)}: a distribution over no classes has "
            "no log-probabilities (check the class axis, `axis`)."
        )


def check_ignore_index(ignore_index: int) -> int:
    """``ignore_index`` as a Python int (an int32 one; int64 under x64)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(
            f"`ignore_index` must be a Python int, got {ignore_index!r} "
            f"({type(ignore_index).__name__})."
        )
    indices = jnp.iinfo(jax.dtypes.canonicalize_dtype(np.int64))
    if not indices.min <= ignore_index <= indices.max:
        raise ValueError(
            f"`ignore_index` must fit the {indices.dtype} class indices, in "
            f"[{indices.min}, {indices.max}], got {ignore_index}: no target can "
            "equal it. Pass the value your padding uses (PyTorch's default is -100)."
        )
    return int(ignore_index)


def _check_scalar_option(value, name: str, ok, allowed: str):
    """A scalar option checked against ``ok`` when its value is concrete.

    Traced values cannot be inspected: only their shape is checked.
    """
    if isinstance(value, jax.core.Tracer):
        if jnp.ndim(value) != 0:
            raise ValueError(f"`{name}` must be a scalar, got shape {value.shape}.")
        return value
    arr = np.asarray(value)
    if np.iscomplexobj(arr):
        raise TypeError(f"`{name}` must be a real scalar ({allowed}), got {value!r}.")
    if arr.ndim != 0 or not jnp.issubdtype(arr.dtype, jnp.number):
        raise ValueError(f"`{name}` must be a real scalar ({allowed}), got {value!r}.")
    if not ok(float(arr)):
        raise ValueError(f"`{name}` must be {allowed}, got {float(arr)!r}.")
    return value if isinstance(value, jax.Array) else float(arr)


def check_unit_interval(value: ArrayLike, name: str) -> ArrayLike:
    """A scalar option in [0, 1] (checked when concrete)."""
    return _check_scalar_option(value, name, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")


def _check_real_dtype(dtype, name: str, *, allow_bool: bool, got: str = "") -> None:
    """Raises ``TypeError`` unless ``dtype`` is a real (float or int) one."""
    ok = jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    if not (ok or (allow_bool and dtype == jnp.bool_)):
        raise TypeError(
            f"`{name}` must be a real (float) array, got {got}dtype {dtype}; pass "
            "e.g. jnp.asarray(..., jnp.float32)."
        )


def check_buffer(value: object, name: str, *, vector: bool, allow_bool: bool) -> None:
    """Checks a loss object's concrete ``weight``/``pos_weight`` when it is built.

    A real array (a vector of class weights when ``vector``); ``None`` and
    traced values (a loss built inside ``jit`` or ``vmap``) pass here, and
    every value is checked against the input's shape when called.
    """
    if value is None or not is_concrete(value):
        return
    try:
        dtype, ndim = np.asarray(value).dtype, np.ndim(value)
    except Exception as e:
        raise TypeError(f"`{name}` must be a real (float) array, got {value!r}.") from e
    _check_real_dtype(dtype, name, allow_bool=allow_bool, got=f"{value!r} of ")
    if vector and ndim != 1:
        raise ValueError(
            f"`{name}` must be a 1-D array of class weights (one per class), "
            f"got shape {np.shape(value)}."
        )


def check_weight(weight: ArrayLike | None, num_classes: int) -> jax.Array | None:
    """Checks that ``weight`` is ``None`` or a real 1-D vector of length C.

    Integer weights (``np.array([1, 2, 1])``) come back as float32: the
    losses scale and poison them as floats.
    """
    if weight is None:
        return None
    w = as_array(weight, "weight")
    _check_real_dtype(w.dtype, "weight", allow_bool=False)
    if w.shape != (num_classes,):
        raise ValueError(
            f"`weight` must be a 1-D array of length C={num_classes} (one weight "
            f"per class), got shape {w.shape}."
        )
    return w if jnp.issubdtype(w.dtype, jnp.floating) else w.astype(jnp.float32)


def class_shape(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """``shape`` with the class axis removed."""
    return shape[:axis] + shape[axis + 1 :]


def describe_axis(axis: int, ndim: int) -> str:
    """The class axis as a user would write it: the last one is ``axis=-1``."""
    return "the last axis (axis=-1)" if axis == ndim - 1 else f"axis={axis}"


def int_target_shape_hint(
    target_shape: tuple[int, ...], input_shape: tuple[int, ...], axis: int, name: str
) -> str:
    """The likely fix for integer targets of the wrong shape ("" if none is seen)."""
    expected = class_shape(input_shape, axis)
    if target_shape == tuple(input_shape):
        user_axis = -1 if axis == len(input_shape) - 1 else axis
        return (
            f" An integer `target` with the shape of `{name}` looks one-hot: pass "
            f"class indices, `jnp.argmax(target, axis={user_axis})`, or class "
            f"probabilities as a floating array, `target.astype({name}.dtype)`."
        )
    if target_shape == (*expected, 1):
        return (
            " `target` has a trailing axis of size 1: pass `target.squeeze(-1)` "
            f"(shape {expected})."
        )
    # Only from rank 3 on: for (N, C) logits another axis would be a guess
    # (a batch of C targets matches axis=0).
    others = [
        a
        for a in range(len(input_shape) if len(input_shape) >= 3 else 0)
        if a != axis and class_shape(input_shape, a) == target_shape
    ]
    if not others:
        return ""
    hints = " or ".join(f"`axis={a}`" for a in others)
    torch_layout = " (PyTorch's (N, C, d1, ...) layout)" if 1 in others else ""
    return (
        f" `target` matches `{name}` with the classes on another axis: pass "
        f"{hints}{torch_layout}."
    )


def check_int_target_shape(
    target_shape: tuple[int, ...], input_shape: tuple[int, ...], axis: int, name: str
) -> None:
    """Integer targets have the input's shape without the class axis."""
    target_shape, input_shape = tuple(target_shape), tuple(input_shape)
    expected = class_shape(input_shape, axis)
    if target_shape != expected:
        where = describe_axis(axis, len(input_shape))
        raise ValueError(
            f"`target` of integer class indices must have the shape of `{name}` "
            f"without the class axis, {where}: expected {expected}, got "
            f"{target_shape} (`{name}`.shape={input_shape})."
            + int_target_shape_hint(target_shape, input_shape, axis, name)
        )


def check_concrete_target_range(
    target: jax.Array, num_classes: int, ignore_index: int
) -> None:
    """Raises ``ValueError`` for class indices outside [0, C) that are not ignored.

    Only concrete (non-traced) targets are inspected; under ``jit`` such entries
    give NaN instead (see ``jxent.check_target`` for a checkify-based check).
    """
    if not is_concrete(target) or target.size == 0:
        return
    t = np.asarray(target)
    bad = (t != ignore_index) & ((t < 0) | (t >= num_classes))
    if bad.any():
        raise ValueError(
            f"`target` contains class index {int(t[bad].flat[0])}, outside "
            f"[0, {num_classes}) and not equal to ignore_index={ignore_index} "
            f"({int(bad.sum())} such entries)."
        )


def check_nonnegative(value: ArrayLike, name: str) -> ArrayLike:
    """A scalar option that must be >= 0 (checked when concrete)."""
    return _check_scalar_option(value, name, lambda v: v >= 0.0, ">= 0")


def check_soft_cap(soft_cap: ArrayLike | None) -> ArrayLike | None:
    """``soft_cap`` is None or a finite scalar > 0 (checked when concrete).

    ``inf`` is refused, not read as "no cap": ``inf · tanh(x / inf)`` is NaN
    (None turns capping off).
    """
    if soft_cap is None:
        return None
    return _check_scalar_option(
        soft_cap, "soft_cap", lambda v: 0.0 < v < np.inf,
        "None (no capping) or a finite number > 0",
    )  # fmt: skip


def check_class_mask(
    where: ArrayLike | None, shape: tuple[int, ...], axis: int
) -> jax.Array | None:
    """A boolean class mask broadcast to ``shape`` (None passes through).

    NumPy broadcasting applies; a 1-D mask of length C is laid along ``axis``.
    """
    if where is None:
        return None
    mask = as_array(where, "where")
    if mask.dtype != jnp.bool_:
        raise TypeError(f"`where` must be a boolean array, got dtype {mask.dtype}.")
    if mask.ndim == 1 and mask.shape[0] == shape[axis] and len(shape) > 1:
        mask = along_axis(mask, len(shape), axis)
    try:
        broadcast = jnp.broadcast_shapes(mask.shape, tuple(shape))
    except ValueError:
        broadcast = None
    if broadcast != tuple(shape):
        raise ValueError(
            f"`where` of shape {tuple(jnp.shape(where))} does not broadcast to the "
            f"logits' shape {tuple(shape)}."
        )
    if mask.ndim < len(shape):
        mask = mask.reshape((1,) * (len(shape) - mask.ndim) + mask.shape)
    return jnp.broadcast_to(mask, shape)


def check_bool(value: object, name: str) -> bool:
    """A static flag must be a Python bool."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {value!r}.")
    return value


def check_real_scalar(value: ArrayLike, name: str) -> ArrayLike:
    """A real scalar option (checked when concrete; a traced one by shape only)."""
    return _check_scalar_option(value, name, lambda v: True, "a real number")


def check_same_shape(
    target: jax.Array, shape: tuple[int, ...], name: str = "logits"
) -> None:
    """Element-wise losses need a ``target`` of exactly the input's shape."""
    if tuple(target.shape) != tuple(shape):
        raise ValueError(
            f"`target` must have the shape of `{name}`: `{name}`.shape="
            f"{tuple(shape)}, `target`.shape={tuple(target.shape)}. Reshape the "
            "target (broadcasting is refused, as in torch)."
        )


def as_elementwise_target(
    target: ArrayLike, shape: tuple[int, ...], name: str = "logits"
) -> jax.Array:
    """A floating, integer or boolean ``target`` of the input's exact shape.

    Integer and boolean targets are returned as they are; the loss casts them to
    its accumulation dtype.
    """
    target = as_array(target, "target")
    if not (
        jnp.issubdtype(target.dtype, jnp.floating)
        or jnp.issubdtype(target.dtype, jnp.integer)
        or target.dtype == jnp.bool_
    ):
        raise TypeError(
            "`target` must be floating (probabilities in [0, 1]), integer or "
            f"boolean, got {target.dtype}."
        )
    check_same_shape(target, shape, name)
    return target


def check_broadcast_weight(
    weight: ArrayLike | None,
    shape: tuple[int, ...],
    name: str = "weight",
    input_name: str = "logits",
) -> jax.Array | None:
    """A real array that broadcasts to ``shape`` (NumPy's rule), rank-padded.

    A 1-D array of length C therefore weights the last axis (one weight per
    class, torch's rule for ``pos_weight``). ``None`` passes through.
    """
    if weight is None:
        return None
    w = as_array(weight, name)
    _check_real_dtype(w.dtype, name, allow_bool=True)
    try:
        broadcast = jnp.broadcast_shapes(w.shape, tuple(shape))
    except ValueError:
        broadcast = None
    if broadcast != tuple(shape):
        raise ValueError(
            f"`{name}` of shape {tuple(w.shape)} does not broadcast to the shape "
            f"of `{input_name}` {tuple(shape)}: it must be a scalar, a vector of "
            f"length {shape[-1] if shape else 1} (one value per class, the last "
            f"axis) or a shape that broadcasts to {tuple(shape)}."
        )
    return w.reshape((1,) * (len(shape) - w.ndim) + w.shape)


def check_concrete_probabilities(
    probs: jax.Array,
    name: str = "probs",
    fix: str = "Pass logits to `binary_cross_entropy_with_logits` instead of "
    "probabilities, or clip.",
) -> None:
    """Raises ``ValueError`` when a concrete ``probs`` has entries outside [0, 1].

    NaN counts as outside (torch refuses it too). Traced values cannot be
    inspected: the loss is then NaN for those entries. ``fix``: the message's
    likely fix.
    """
    if not is_concrete(probs) or probs.size == 0:
        return
    # In NumPy: under an outer trace (a constant captured by a jitted
    # function), probs.astype would be a tracer.
    p = np.asarray(probs)
    p = p.astype(np.float32) if probs.dtype == jnp.bfloat16 else p
    bad = ~((p >= 0) & (p <= 1))
    if bad.any():
        raise ValueError(
            f"`{name}` must hold probabilities in [0, 1]; got {p[bad].flat[0]!r} "
            f"({int(bad.sum())} such entries). {fix}"
        )


def as_int_target(target: ArrayLike) -> jax.Array:
    """``target`` as signed integer class indices (``TypeError`` if not integers).

    Narrow and unsigned indices become ``int32`` (``int64`` for 64-bit ones
    under x64), so that comparing them with a negative ``ignore_index`` is
    exact: a ``uint8`` 156 is class 156, not ``-100`` wrapped. Unsigned
    values past the signed maximum (outside any class range) saturate there.
    A concrete index that JAX would wrap to 32 bits (without x64) raises.
    """
    array = as_array(target, "target")
    if not jnp.issubdtype(array.dtype, jnp.integer):
        raise TypeError(
            "`target` must hold integer class indices (int32, int64, uint8, ...), "
            f"got {array.dtype}."
        )
    return _signed_indices(target, array)


def as_target_array(target: ArrayLike) -> jax.Array:
    """``target`` as an array; class indices as ``as_int_target`` gives them."""
    array = as_array(target, "target")
    if jnp.issubdtype(array.dtype, jnp.integer):
        return _signed_indices(target, array)
    return array


def _signed_indices(passed: object, target: jax.Array) -> jax.Array:
    """``target = jnp.asarray(passed)``, integers, as ``as_int_target`` gives it."""
    _check_not_wrapped(passed, target)
    if jnp.issubdtype(target.dtype, jnp.signedinteger) and target.dtype.itemsize >= 4:
        return target
    if target.dtype.itemsize < 4:
        return target.astype(jnp.int32)
    signed = jnp.int32 if target.dtype.itemsize == 4 else jnp.int64
    top = jnp.iinfo(signed).max
    # In NumPy: under an outer trace (a constant captured by a jitted
    # function), jnp.max of a concrete array would be a tracer.
    concrete = is_concrete(target) and target.size
    largest = int(np.max(np.asarray(target))) if concrete else 0
    if largest > top:
        raise ValueError(
            f"`target` contains class index {largest}, outside [0, C) for any "
            f"number of classes C (the most is {top})."
        )
    return jnp.minimum(target, top).astype(signed)


def _check_not_wrapped(passed: object, target: jax.Array) -> None:
    """Raises if converting the concrete ``passed`` to ``target`` changed a value."""
    if isinstance(passed, jax.Array) or target.size == 0:
        return
    given = np.asarray(passed)
    if given.dtype.itemsize <= target.dtype.itemsize:
        return
    # (In NumPy: under jit, ``target`` is a tracer even for a NumPy constant.)
    converted = given.astype(target.dtype)
    wrapped = converted.astype(given.dtype) != given
    if wrapped.any():
        raise ValueError(
            f"`target` contains class index {given[wrapped].flat[0]}, which does "
            f"not fit the {target.dtype} that JAX converts {given.dtype} to without "
            f"`jax_enable_x64` (it would wrap to {converted[wrapped].flat[0]}). "
            "Class indices must be in [0, C) or equal to ignore_index."
        )
