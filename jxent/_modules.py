"""Callable loss objects for code ported from ``torch.nn``.

``weight``, ``label_smoothing`` and ``pos_weight`` are *buffers*, as in
``torch.nn``, where they are never ``Parameter``s: a concrete value is static
configuration (part of the pytree structure, compared and hashed by value,
like ``reduction``), never a leaf. No optimiser, gradient filter or weight
decay sees it: ``eqx.filter(model, eqx.is_inexact_array)`` and
``nnx.Optimizer(..., wrt=nnx.Param)`` leave it bit-identical, and a flax nnx
``Module`` may hold a loss object as a plain attribute. A value that is traced
when the object is built (inside ``jit``, ``vmap`` or ``grad``) is a leaf, so
losses built inside a transformed function stay traceable; the functional API
(``jxent.cross_entropy`` and friends) differentiates every floating input.

Options are validated when a user builds an object, never when JAX rebuilds
one from its tree: ``jax.tree.map`` with any leaves (None, bools,
``ShapeDtypeStruct``), ``equinox.partition``/``combine``/``filter_grad`` and
optimiser states over a model that holds a loss object all work. An object
whose buffers are concrete is hashable, so it can be a static argument.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, dataclass_transform

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jxent._binary import binary_cross_entropy, binary_cross_entropy_with_logits
from jxent._classification import cross_entropy, nll_loss
from jxent._information import KL_REDUCTIONS, kl_div
from jxent._types import KLReduction, Reduction
from jxent._validation import (
    REDUCTIONS,
    check_axis,
    check_bool,
    check_buffer,
    check_ignore_index,
    check_reduction,
    check_unit_interval,
    is_concrete,
)


def _value_key(value: object) -> object:
    """A hashable stand-in for a concrete buffer (arrays by value)."""
    if value is None:
        return None
    if not is_concrete(value):
        raise TypeError(
            "A loss object built from traced `weight`, `label_smoothing` or "
            "`pos_weight` is not hashable; pass it as a regular (pytree) argument "
            "instead, or build it from concrete values."
        )
    try:
        arr = np.asarray(value)
    except Exception:  # a placeholder put there by jax.tree.map
        return ("object", id(value))
    return (arr.shape, str(arr.dtype), arr.tobytes())


class _Frozen:
    """A concrete buffer in the pytree structure: equal and hashed by value."""

    __slots__ = ("_hash", "key", "value")

    def __init__(self, value: object) -> None:
        self.value = value
        self.key = _value_key(value)
        self._hash = hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Frozen) and self.key == other.key

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"_Frozen({self.value!r})"


class _LossModule:
    """Shared equality and hashing by configuration (options and buffers)."""

    def _key(self) -> tuple:
        return tuple(
            _value_key(getattr(self, f.name))
            if f.metadata.get("buffer")
            else getattr(self, f.name)
            for f in dataclasses.fields(self)
        )

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash((type(self), self._key()))

    def __getstate__(self) -> dict:
        """Copies and pickles carry the fields, not the cached tree structure."""
        return {k: v for k, v in self.__dict__.items() if k != "_pytree_aux"}

    def __setstate__(self, state: dict) -> None:
        """A copied or unpickled buffer is read-only again (see __init__)."""
        for name, value in state.items():
            if isinstance(value, np.ndarray):
                value = _read_only_copy(value)
            object.__setattr__(self, name, value)


def _check_label_smoothing_values(value: object) -> None:
    """Raises unless every concrete entry is in [0, 1].

    A stacked module (built inside ``vmap``) may hold one value per member;
    traced values cannot be checked.
    """
    if not is_concrete(value):
        return
    arr = np.asarray(value)
    if arr.ndim == 0:
        check_unit_interval(value, "label_smoothing")
        return
    if not jnp.issubdtype(arr.dtype, jnp.number) or np.any((arr < 0) | (arr > 1)):
        raise ValueError(
            "`label_smoothing` must be real values in [0, 1] (one per member of "
            f"a stacked loss), got {value!r}."
        )


_BUFFER = {"buffer": True}
_STATIC = {"static": True}
_TRACED = "traced"  # marks a buffer field whose value is a leaf


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def _loss_pytree(cls: type) -> type:
    """Makes ``cls`` a frozen dataclass and a pytree that unflattens unchecked.

    Fields with ``metadata={"buffer": True}`` are buffers: a concrete value is
    kept in the tree structure (wrapped in :class:`_Frozen`), a traced one is a
    leaf. The other fields are static options. Unflattening sets the fields
    directly, without ``__init__``/``__post_init__``, so JAX and equinox can
    put any placeholder into a leaf; users' constructor calls still validate.
    """
    cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
    fields = dataclasses.fields(cls)
    buffers = tuple(f.name for f in fields if f.metadata.get("buffer"))
    statics = tuple(f.name for f in fields if not f.metadata.get("buffer"))

    def structure(obj: Any) -> tuple[tuple, list[str]]:
        """``(aux, traced buffer names)``; the aux is cached on the object."""
        cached = obj.__dict__.get("_pytree_aux")
        if cached is None:
            kinds = []
            traced = []
            # Buffers that were leaves of the tree this object was rebuilt
            # from stay leaves, whatever JAX or equinox put there (a bool,
            # None, the concrete result of a jit): the structure must not
            # change between a flatten and the next.
            leaves = obj.__dict__.get("_pytree_leaves", ())
            for name in buffers:
                value = getattr(obj, name)
                if name not in leaves and is_concrete(value):
                    kinds.append(_Frozen(value))
                else:
                    kinds.append(_TRACED)
                    traced.append(name)
            aux = (tuple(getattr(obj, n) for n in statics), tuple(kinds))
            cached = (aux, traced)
            if not traced:  # tracers must not outlive their trace in a cache
                object.__setattr__(obj, "_pytree_aux", cached)
        return cached

    def flatten_with_keys(obj):
        aux, traced = structure(obj)
        children = [(jax.tree_util.GetAttrKey(n), getattr(obj, n)) for n in traced]
        return children, aux

    def flatten(obj):
        aux, traced = structure(obj)
        return [getattr(obj, n) for n in traced], aux

    def unflatten(aux, children):
        obj = object.__new__(cls)
        static_values, kinds = aux
        for name, value in zip(statics, static_values, strict=True):
            object.__setattr__(obj, name, value)
        leaves = iter(children)
        for name, kind in zip(buffers, kinds, strict=True):
            value = next(leaves) if kind is _TRACED else kind.value
            object.__setattr__(obj, name, value)
        names = frozenset(
            n for n, k in zip(buffers, kinds, strict=True) if k is _TRACED
        )
        if names:
            object.__setattr__(obj, "_pytree_leaves", names)
        return obj

    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        for name in buffers:
            value = getattr(self, name)
            if isinstance(value, np.ndarray | list | tuple):
                object.__setattr__(self, name, _read_only_copy(value))
            elif isinstance(value, int | float) and not isinstance(value, bool):
                # label_smoothing=0 is the default 0.0: equal, one program.
                object.__setattr__(self, name, float(value))

    cls.__init__ = __init__
    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls


def _read_only_copy(value: object) -> np.ndarray:
    """A mutable concrete buffer (a NumPy array, a list) as a frozen copy.

    The buffer is static configuration, hashed by value when the object is
    built: writing into the caller's array afterwards must not change what
    an eager call computes while a compiled program keeps the old value.
    """
    frozen = np.array(value, copy=True)
    frozen.flags.writeable = False
    return frozen


@_loss_pytree
class NLLLoss(_LossModule):
    """``torch.nn.NLLLoss``: calls [`jxent.nll_loss`][] with stored options.

    ``weight`` is a buffer, never trained (as ``CrossEntropyLoss``'s). Each
    argument is stored as the attribute of the same name.

    Args:
      weight: optional length-C class weights; a buffer (never trained).
      ignore_index: target value that is ignored (contributes nothing).
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.
      axis: the class axis (``1`` for PyTorch's ``(N, C, d1, ...)`` layout).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> loss_fn = jxent.NLLLoss(reduction="sum")
      >>> loss_fn(jnp.log(jnp.array([[0.5, 0.5]])), jnp.array([0]))
      Array(0.6931..., dtype=float32)
    """

    weight: ArrayLike | None = dataclasses.field(default=None, metadata=_BUFFER)
    _: dataclasses.KW_ONLY
    ignore_index: int = dataclasses.field(default=-100, metadata=_STATIC)
    reduction: Reduction = dataclasses.field(default="mean", metadata=_STATIC)
    axis: int = dataclasses.field(default=-1, metadata=_STATIC)

    def __post_init__(self) -> None:
        check_reduction(self.reduction, REDUCTIONS)
        check_ignore_index(self.ignore_index)
        check_buffer(self.weight, "weight", vector=True, allow_bool=False)
        check_axis(self.axis)

    def __call__(self, input: ArrayLike, target: ArrayLike) -> jax.Array:
        """The loss of log-probabilities ``input`` against ``target``."""
        return nll_loss(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            axis=self.axis,
        )


@_loss_pytree
class CrossEntropyLoss(_LossModule):
    """``torch.nn.CrossEntropyLoss``: calls [`jxent.cross_entropy`][].

    ``weight`` and ``label_smoothing`` are buffers, as in ``torch.nn``: a
    concrete value is static configuration (compared and hashed by value,
    never a pytree leaf, so no optimizer trains it); a traced value given to
    the constructor stays a traced leaf. Each argument is stored as the
    attribute of the same name.

    Args:
      weight: optional length-C class weights; a buffer (never trained).
      ignore_index: integer target value that is ignored (contributes nothing).
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.
      label_smoothing: ``ε`` in ``[0, 1]``; a buffer (never trained).
      axis: the class axis (``1`` for PyTorch's ``(N, C, d1, ...)`` layout).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> loss_fn = jxent.CrossEntropyLoss(label_smoothing=0.1)
      >>> loss_fn(jnp.array([[2.0, 0.0, 0.0]]), jnp.array([0]))
      Array(0.3728..., dtype=float32)
    """

    weight: ArrayLike | None = dataclasses.field(default=None, metadata=_BUFFER)
    _: dataclasses.KW_ONLY
    ignore_index: int = dataclasses.field(default=-100, metadata=_STATIC)
    reduction: Reduction = dataclasses.field(default="mean", metadata=_STATIC)
    label_smoothing: ArrayLike = dataclasses.field(default=0.0, metadata=_BUFFER)
    axis: int = dataclasses.field(default=-1, metadata=_STATIC)

    def __post_init__(self) -> None:
        check_reduction(self.reduction, REDUCTIONS)
        check_ignore_index(self.ignore_index)
        check_buffer(self.weight, "weight", vector=True, allow_bool=False)
        _check_label_smoothing_values(self.label_smoothing)
        check_axis(self.axis)

    def __call__(self, input: ArrayLike, target: ArrayLike) -> jax.Array:
        """The loss of logits ``input`` against ``target``."""
        return cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            axis=self.axis,
        )


@_loss_pytree
class KLDivLoss(_LossModule):
    """``torch.nn.KLDivLoss``: calls [`jxent.kl_div`][] with stored options.

    Each argument is stored as the attribute of the same name.

    Args:
      reduction: ``"none"``, ``"batchmean"`` (the true KL), ``"sum"`` or ``"mean"``.
      log_target: whether ``target`` is given in log space.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> loss_fn = jxent.KLDivLoss(reduction="batchmean")
      >>> loss_fn(jnp.log(jnp.array([[0.25, 0.75]])), jnp.array([[0.5, 0.5]]))
      Array(0.1438..., dtype=float32)
    """

    _: dataclasses.KW_ONLY
    reduction: KLReduction = dataclasses.field(default="mean", metadata=_STATIC)
    log_target: bool = dataclasses.field(default=False, metadata=_STATIC)

    def __post_init__(self) -> None:
        check_reduction(self.reduction, KL_REDUCTIONS)
        check_bool(self.log_target, "log_target")

    def __call__(self, input: ArrayLike, target: ArrayLike) -> jax.Array:
        """The divergence of log-probabilities ``input`` from ``target``."""
        return kl_div(
            input, target, reduction=self.reduction, log_target=self.log_target
        )


@_loss_pytree
class BCELoss(_LossModule):
    """``torch.nn.BCELoss``: calls [`jxent.binary_cross_entropy`][].

    ``weight`` is a buffer, never trained (as ``CrossEntropyLoss``'s). Each
    argument is stored as the attribute of the same name.

    Args:
      weight: optional weights broadcastable to the input; a buffer.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> loss_fn = jxent.BCELoss(reduction="sum")
      >>> loss_fn(jnp.array([0.5, 0.9]), jnp.array([1.0, 1.0]))
      Array(0.7985..., dtype=float32)
    """

    weight: ArrayLike | None = dataclasses.field(default=None, metadata=_BUFFER)
    _: dataclasses.KW_ONLY
    reduction: Reduction = dataclasses.field(default="mean", metadata=_STATIC)

    def __post_init__(self) -> None:
        check_reduction(self.reduction)
        check_buffer(self.weight, "weight", vector=False, allow_bool=True)

    def __call__(self, input: ArrayLike, target: ArrayLike) -> jax.Array:
        """The loss of probabilities ``input`` against ``target``."""
        return binary_cross_entropy(
            input, target, self.weight, reduction=self.reduction
        )


@_loss_pytree
class BCEWithLogitsLoss(_LossModule):
    """``torch.nn.BCEWithLogitsLoss``: the logits loss with stored options.

    Calls [`jxent.binary_cross_entropy_with_logits`][]. ``weight`` and
    ``pos_weight`` are buffers, never trained (as ``CrossEntropyLoss``'s).
    Each argument is stored as the attribute of the same name.

    Args:
      weight: optional weights broadcastable to the input; a buffer.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.
      pos_weight: optional weights of the positive term (length C weights each
        class, the last axis); a buffer (never trained).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> loss_fn = jxent.BCEWithLogitsLoss(pos_weight=jnp.array([2.0, 1.0]))
      >>> loss_fn(jnp.array([[0.0, 0.0]]), jnp.array([[1.0, 0.0]]))
      Array(1.0397..., dtype=float32)
    """

    weight: ArrayLike | None = dataclasses.field(default=None, metadata=_BUFFER)
    _: dataclasses.KW_ONLY
    reduction: Reduction = dataclasses.field(default="mean", metadata=_STATIC)
    pos_weight: ArrayLike | None = dataclasses.field(default=None, metadata=_BUFFER)

    def __post_init__(self) -> None:
        check_reduction(self.reduction)
        check_buffer(self.weight, "weight", vector=False, allow_bool=True)
        check_buffer(self.pos_weight, "pos_weight", vector=False, allow_bool=True)

    def __call__(self, input: ArrayLike, target: ArrayLike) -> jax.Array:
        """The loss of logits ``input`` against ``target``."""
        return binary_cross_entropy_with_logits(
            input,
            target,
            self.weight,
            pos_weight=self.pos_weight,
            reduction=self.reduction,
        )
