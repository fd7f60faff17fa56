"""Type aliases of the public signatures.

Exported as ``jxent.Reduction`` and ``jxent.KLReduction``, for users who type
their own configuration.
"""

from __future__ import annotations

from typing import Literal, TypeAlias

Reduction: TypeAlias = Literal["none", "mean", "sum"]
"""How per-position losses are combined: ``"none"`` keeps them, ``"mean"`` is
the (weighted) mean, ``"sum"`` the sum.

Annotate a configuration value with it (``reduction: jxent.Reduction = "sum"``)
so that a type checker accepts it as a ``reduction`` argument; a plain ``str``
is rejected.
"""

KLReduction: TypeAlias = Literal["none", "mean", "sum", "batchmean"]
"""``kl_div``'s reductions: those of ``Reduction`` and ``"batchmean"`` (the sum
divided by the batch size, as ``torch.nn.functional.kl_div``)."""
