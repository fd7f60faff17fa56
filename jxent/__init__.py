"""jxent: PyTorch-exact, differentiable classification losses for JAX."""

from jxent._binary import binary_cross_entropy as binary_cross_entropy
from jxent._binary import (
    binary_cross_entropy_with_logits as binary_cross_entropy_with_logits,
)
from jxent._binary import sigmoid_focal_loss as sigmoid_focal_loss
from jxent._classification import cross_entropy as cross_entropy
from jxent._classification import nll_loss as nll_loss
from jxent._information import entropy as entropy
from jxent._information import kl_div as kl_div
from jxent._linear import linear_cross_entropy as linear_cross_entropy
from jxent._linear_heads import linear_argmax as linear_argmax
from jxent._linear_heads import (
    linear_distillation_loss as linear_distillation_loss,
)
from jxent._linear_heads import linear_log_probs as linear_log_probs
from jxent._modules import BCELoss as BCELoss
from jxent._modules import BCEWithLogitsLoss as BCEWithLogitsLoss
from jxent._modules import CrossEntropyLoss as CrossEntropyLoss
from jxent._modules import KLDivLoss as KLDivLoss
from jxent._modules import NLLLoss as NLLLoss
from jxent._rl import distillation_loss as distillation_loss
from jxent._rl import log_probs as log_probs
from jxent._runtime_checks import check_target as check_target
from jxent._softmax import log_softmax as log_softmax
from jxent._softmax import softmax as softmax
from jxent._types import KLReduction as KLReduction
from jxent._types import Reduction as Reduction

__version__ = "0.1.0"

__all__ = [
    "BCELoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "KLDivLoss",
    "KLReduction",
    "NLLLoss",
    "Reduction",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "check_target",
    "cross_entropy",
    "distillation_loss",
    "entropy",
    "kl_div",
    "linear_argmax",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_log_probs",
    "log_probs",
    "log_softmax",
    "nll_loss",
    "sigmoid_focal_loss",
    "softmax",
]
