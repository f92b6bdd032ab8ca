"""Training: configs, the loop, objectives, optimizer and precision choices."""

from lmforge.train.config import DataConfig, TrainConfig
from lmforge.train.trainer import TrainingDiverged, TrainResult, estimate_loss, train

__all__ = ["DataConfig", "TrainConfig", "TrainResult", "TrainingDiverged", "estimate_loss", "train"]
