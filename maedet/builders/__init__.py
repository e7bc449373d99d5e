"""The one layer that turns configs into objects: models, datasets and loaders, optimizer and
schedule, trainer, evaluator, predictor. Tools, the benchmark and user code build through it;
models, data, engine and evaluation never read a config.
"""

from .config import load_detection_config, load_pretrain_config  # noqa: F401
from .model import build_detection_model, build_mae_model, detection_layout, load_detection_weights  # noqa: F401
from .predictor import build_predictor  # noqa: F401
from .tasks import run_detection_training, run_evaluation, run_pretraining  # noqa: F401

__all__ = [
    "build_detection_model",
    "build_mae_model",
    "build_predictor",
    "detection_layout",
    "load_detection_config",
    "load_detection_weights",
    "load_pretrain_config",
    "run_detection_training",
    "run_evaluation",
    "run_pretraining",
]
