"""Opt-in runtime checks of target values under ``jit`` via checkify."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.typing import ArrayLike

from jxent._validation import as_int_target, check_ignore_index


def check_target(
    target: ArrayLike, num_classes: int, *, ignore_index: int = -100
) -> jax.Array:
    """Checks at run time that class indices are in ``[0, C)`` or ignored.

    ``cross_entropy`` and ``nll_loss`` raise for a bad concrete target, but
    under ``jit`` the values are unknown at trace time: there a bad index
    yields NaN. To get an error instead, pass the target through this function
    and wrap the computation in ``jax.experimental.checkify.checkify``,
    then call ``err.throw()``. Without ``checkify`` this function raises at
    trace time under ``jit`` (a checkify requirement), which is why the check
    is opt-in and not built into the losses.

    Runtime errors are reliable on CPU; on GPU and TPU, follow the
    ``checkify`` documentation.

    Args:
      target: integer class indices (``TypeError`` for another dtype: class
        probabilities need no index check).
      num_classes: the number of classes ``C``, a positive int.
      ignore_index: the value that marks ignored positions.

    Returns:
      ``target`` unchanged, as a ``jax.Array``.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from jax.experimental import checkify
      >>> import jxent
      >>> def loss(logits, target):
      ...     target = jxent.check_target(target, logits.shape[-1])
      ...     return jxent.cross_entropy(logits, target)
      >>> checked = jax.jit(checkify.checkify(loss))
      >>> err, value = checked(jnp.zeros((2, 3)), jnp.array([0, 3]))
      >>> print(err.get())  # doctest: +ELLIPSIS
      `target` must be in [0, 3) or equal ignore_index=-100; got 3 ...
    """
    ignore_index = check_ignore_index(ignore_index)
    target = as_int_target(target)
    is_int = isinstance(num_classes, int | np.integer)
    if isinstance(num_classes, bool | float) or (is_int and num_classes < 1):
        raise ValueError(
            f"`num_classes` must be a positive int (C, the size of the class "
            f"axis), got {num_classes!r}."
        )
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    flat_bad = bad.ravel()
    first_bad = (
        target.ravel()[jnp.argmax(flat_bad)] if target.size else jnp.zeros((), int)
    )
    checkify.check(
        ~jnp.any(bad),
        f"`target` must be in [0, {num_classes}) or equal "
        f"ignore_index={ignore_index}; got {{bad_value}} ({{count}} bad entries)",
        bad_value=first_bad,
        count=jnp.sum(bad),
    )
    return target
