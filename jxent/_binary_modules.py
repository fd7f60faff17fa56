"""``BCELoss`` and ``BCEWithLogitsLoss``: ``torch.nn`` modules as pytrees.

``weight`` and ``pos_weight`` are leaves (traced when the object is passed into
``jit``: new values never recompile), ``reduction`` is static metadata. Only
the static field is validated when an object is built, so that JAX can rebuild
one from any leaves (``jax.tree.map``, ``equinox.partition``); the leaves are
checked when the loss is called.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.typing import ArrayLike

from jxent._binary import binary_cross_entropy, binary_cross_entropy_with_logits
from jxent._modules import _LossModule
from jxent._validation import check_reduction

_LEAF = {"leaf": True}
_STATIC = {"static": True}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class BCELoss(_LossModule):
    """``torch.nn.BCELoss``: calls :func:`jxent.binary_cross_entropy`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> loss_fn = jxent.BCELoss(reduction="sum")
      >>> loss_fn(jnp.array([0.5, 0.9]), jnp.array([1.0, 1.0]))
      Array(0.7985..., dtype=float32)
    """

    weight: ArrayLike | None = dataclasses.field(default=None, metadata=_LEAF)
    _: dataclasses.KW_ONLY
    reduction: str = dataclasses.field(default="mean", metadata=_STATIC)

    def __post_init__(self) -> None:
        check_reduction(self.reduction)

    def __call__(self, input: ArrayLike, target: ArrayLike) -> jax.Array:
        """The loss of probabilities ``input`` against ``target``."""
        return binary_cross_entropy(
            input, target, self.weight, reduction=self.reduction
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class BCEWithLogitsLoss(_LossModule):
    """``torch.nn.BCEWithLogitsLoss``: calls ``binary_cross_entropy_with_logits``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> loss_fn = jxent.BCEWithLogitsLoss(pos_weight=jnp.array([2.0, 1.0]))
      >>> loss_fn(jnp.array([[0.0, 0.0]]), jnp.array([[1.0, 0.0]]))
      Array(1.0397..., dtype=float32)
    """

    weight: ArrayLike | None = dataclasses.field(default=None, metadata=_LEAF)
    _: dataclasses.KW_ONLY
    reduction: str = dataclasses.field(default="mean", metadata=_STATIC)
    pos_weight: ArrayLike | None = dataclasses.field(default=None, metadata=_LEAF)

    def __post_init__(self) -> None:
        check_reduction(self.reduction)

    def __call__(self, input: ArrayLike, target: ArrayLike) -> jax.Array:
        """The loss of logits ``input`` against ``target``."""
        return binary_cross_entropy_with_logits(
            input,
            target,
            self.weight,
            pos_weight=self.pos_weight,
            reduction=self.reduction,
        )
