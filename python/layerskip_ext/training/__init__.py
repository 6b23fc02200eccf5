"""LayerSkip training hooks: per-sample layer dropout, the chunked early-exit loss, ``prepare_model``, and the
``layerskip train`` recipe (see docs/training.md)."""
from ..errors import TrainingError
from .early_exit import EarlyExitLossConfig, exit_weights
from .layer_dropout import LayerDropout, LayerDropoutConfig, LayerSkipLayer
from .prepare import (
           LayerSkipLoss,
           LossOutput,
           TrainingForward,
           layer_outputs,
           model_kind,
           prepare_model,
           shift_labels,
           unprepare_model,
)
from .scales import EXIT_CURRICULA, EXIT_LOSS_SCALES, LAYER_SCALES, TIME_CURRICULA, exit_scale, layer_scale, time_scale

__all__ = ["TrainingError", "EarlyExitLossConfig", "LayerDropoutConfig", "LayerDropout", "LayerSkipLayer",
           "LayerSkipLoss", "LossOutput", "TrainingForward", "prepare_model", "unprepare_model", "layer_outputs",
           "model_kind", "shift_labels", "exit_weights", "layer_scale", "time_scale", "exit_scale",
           "LAYER_SCALES", "TIME_CURRICULA", "EXIT_LOSS_SCALES", "EXIT_CURRICULA"]
