"""kdforge: make deep models small and fast — distillation, pruning, continual learning."""

from kdforge import audio, clip, compress, continual, diffusion, distill, llm, losses, models, reid, rl  # noqa: F401 - registers them
from kdforge.config import Recipe
from kdforge.data import DataBundle, load_data
from kdforge.distill import Distill, Term
from kdforge.engine.callbacks import Callback
from kdforge.engine.checkpoint import load_weights, save_weights
from kdforge.engine.optim import OptimizerSpec
from kdforge.engine.trainer import FitResult, StepSource, Trainer
from kdforge.errors import KdforgeError
from kdforge.evaluate import load_deployable
from kdforge.losses import DistillLoss, KDLoss, build_loss, kd_loss
from kdforge.method import DataInfo, Method, Supervised
from kdforge.models import create_model
from kdforge.profile import count_flops, count_params, measure_latency, profile
from kdforge.run import train
from kdforge.taps import FeatureTaps

__version__ = "0.1.0"

# kd.compress(recipe, out): the package is callable (kdforge.compress.compress)
__all__ = [
    "Callback", "DataBundle", "DataInfo", "Distill", "DistillLoss", "FeatureTaps", "FitResult", "KDLoss",
    "KdforgeError", "Method", "OptimizerSpec", "Recipe", "StepSource", "Supervised", "Term", "Trainer", "build_loss",
    "compress", "count_flops", "count_params", "create_model", "kd_loss", "load_data", "load_deployable",
    "load_weights", "measure_latency", "profile", "save_weights", "train",
]
