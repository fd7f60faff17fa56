"""Type aliases of the public signatures."""

from __future__ import annotations

from typing import Literal, TypeAlias

#: How per-position losses are combined: ``"none"`` keeps them, ``"mean"`` is
#: the (weighted) mean, ``"sum"`` the sum.
Reduction: TypeAlias = Literal["none", "mean", "sum"]

#: ``kl_div``'s reductions: those of :data:`Reduction` and ``"batchmean"``
#: (the sum divided by the batch size, as ``torch.nn.functional.kl_div``).
KLReduction: TypeAlias = Literal["none", "mean", "sum", "batchmean"]
