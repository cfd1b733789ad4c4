"""bnrnn: batch-normalised recurrent networks that drop in for `torch.nn.LSTM`.

Cooijmans et al. (2017), "Recurrent Batch Normalization", and Laurent et al. (2016),
"Batch Normalized Recurrent Neural Networks"; the layer-normalised LSTM of Ba et al. (2016),
"Layer Normalization" (``norm="layer"``). The library core depends on torch only.
"""

from torch import serialization as _serialization

from .cell import BNLSTMCell, BNRNNCell
from .functional import StepNorms, lstm_step, rnn_step
from .layernorm import StepLayerNorm
from .norm import StepBatchNorm
from .population import update_population_stats
from .rnn import BNLSTM, BNRNN, convert_sync_batchnorm

__all__ = [
    "BNLSTM",
    "BNLSTMCell",
    "BNRNN",
    "BNRNNCell",
    "StepBatchNorm",
    "StepLayerNorm",
    "StepNorms",
    "lstm_step",
    "rnn_step",
    "convert_sync_batchnorm",
    "update_population_stats",
]
__version__ = "0.1.0"

# `torch.load` reads with weights_only=True by default: a whole model saved with
# `torch.save(model)` that holds these modules then loads without the user listing them
# (torch < 2.4 has no allowlist and loads whole models with weights_only=False only).
if hasattr(_serialization, "add_safe_globals"):
    _serialization.add_safe_globals(
        [BNLSTM, BNRNN, BNLSTMCell, BNRNNCell, StepBatchNorm, StepLayerNorm]
    )
