"""Callable loss objects for code ported from ``torch.nn``.

They are pytrees: ``weight`` and ``label_smoothing`` are leaves (traced when
the object is passed into ``jit``, so new values never recompile), while
``ignore_index``, ``reduction`` and ``axis`` are static metadata. An object
whose leaves are concrete is also hashable, so it can be a static argument.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.typing import ArrayLike

from jxent._classification import cross_entropy, nll_loss
from jxent._validation import (
    REDUCTIONS,
    check_ignore_index,
    check_reduction,
    check_unit_interval,
    is_concrete,
)


def _leaf_key(value: object) -> object:
    """A hashable stand-in for a concrete leaf (arrays by value)."""
    if value is None:
        return None
    if not is_concrete(value):
        raise TypeError(
            "A loss object with traced `weight` or `label_smoothing` is not "
            "hashable; pass it as a regular (pytree) argument instead."
        )
    arr = np.asarray(value)
    return (arr.shape, str(arr.dtype), arr.tobytes())


class _LossModule:
    """Shared equality and hashing by configuration (static fields and leaves)."""

    def _key(self) -> tuple:
        return tuple(
            _leaf_key(getattr(self, f.name))
            if f.metadata.get("leaf")
            else getattr(self, f.name)
            for f in dataclasses.fields(self)
        )

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash((type(self), self._key()))


_LEAF = {"leaf": True}
_STATIC = {"static": True}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class NLLLoss(_LossModule):
    """``torch.nn.NLLLoss``: calls :func:`jxent.nll_loss` with stored options.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> loss_fn = jxent.NLLLoss(reduction="sum")
      >>> loss_fn(jnp.log(jnp.array([[0.5, 0.5]])), jnp.array([0]))
      Array(0.6931..., dtype=float32)
    """

    weight: ArrayLike | None = dataclasses.field(default=None, metadata=_LEAF)
    _: dataclasses.KW_ONLY
    ignore_index: int = dataclasses.field(default=-100, metadata=_STATIC)
    reduction: str = dataclasses.field(default="mean", metadata=_STATIC)
    axis: int = dataclasses.field(default=-1, metadata=_STATIC)

    def __post_init__(self) -> None:
        check_reduction(self.reduction, REDUCTIONS)
        check_ignore_index(self.ignore_index)

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class CrossEntropyLoss(_LossModule):
    """``torch.nn.CrossEntropyLoss``: calls :func:`jxent.cross_entropy`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> loss_fn = jxent.CrossEntropyLoss(label_smoothing=0.1)
      >>> loss_fn(jnp.array([[2.0, 0.0, 0.0]]), jnp.array([0]))
      Array(0.3728..., dtype=float32)
    """

    weight: ArrayLike | None = dataclasses.field(default=None, metadata=_LEAF)
    _: dataclasses.KW_ONLY
    ignore_index: int = dataclasses.field(default=-100, metadata=_STATIC)
    reduction: str = dataclasses.field(default="mean", metadata=_STATIC)
    label_smoothing: ArrayLike = dataclasses.field(default=0.0, metadata=_LEAF)
    axis: int = dataclasses.field(default=-1, metadata=_STATIC)

    def __post_init__(self) -> None:
        check_reduction(self.reduction, REDUCTIONS)
        check_ignore_index(self.ignore_index)
        # Pytree unflattening may store placeholders here: check plain numbers.
        if isinstance(self.label_smoothing, (int, float)):
            check_unit_interval(self.label_smoothing, "label_smoothing")

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
