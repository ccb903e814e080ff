"""Models: encoders, task heads, the registry that assembles multi-task Taskonomy models and classifiers, and
checkpoints."""
from mtrobust_fast.models import libmtl, source_import
from mtrobust_fast.models.checkpoint import FORMAT, load_checkpoint, read_checkpoint, save_checkpoint
from mtrobust_fast.models.decoders import ClassificationHead, TaskonomyDecoder
from mtrobust_fast.models.multitask import STRIDE, MultiTaskModel, check_image_batch
from mtrobust_fast.models.registry import (
    build_classifier,
    build_dense_model,
    build_encoder,
    build_model,
    list_encoders,
    model_from_config,
    register_encoder,
)

__all__ = [
    "FORMAT",
    "STRIDE",
    "ClassificationHead",
    "MultiTaskModel",
    "TaskonomyDecoder",
    "build_classifier",
    "build_dense_model",
    "build_encoder",
    "build_model",
    "check_image_batch",
    "list_encoders",
    "load_checkpoint",
    "model_from_config",
    "read_checkpoint",
    "register_encoder",
    "save_checkpoint",
    "libmtl",
    "source_import",
]
