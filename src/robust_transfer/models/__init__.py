"""Models: architecture registry (registered names, any timm architecture, a user's own builder),
normalisation wrapper, stages and heads, our model file format, other tools' formats and the zoo.

Every model handed around takes images in [0, 1], NCHW, and holds its own normalisation in
front (`NormalizedModel`), so an eps means the same for every model. Loading goes one way:
`load_model` (loading.py) chooses between our files (model_file.py), other tools' files (foreign/)
and zoo names (model_dir.py, manifest.py), which know nothing of each other.
"""

from .export import EXPORT_FORMATS, export_model
from .foreign import convert_state_dict, infer_architectures, load_foreign
from .loading import load_model
from .model_file import FORMAT, save_model
from .normalization import IMAGENET_MEAN, IMAGENET_STD, Normalize, NormalizedModel
from .registry import ARCHITECTURES, create_model, list_architectures, with_builder, with_normalization
from .spec import ModelSpec

# Stages for partial transfer and new heads (`stages()` itself stays in models.stages, so that the
# package attribute `stages` keeps naming the module).
from .stages import FrozenInfo, MLPHead, freeze_stages, head_name, num_stages, replace_head, set_train_mode
from .surgery import classifier_head, first_conv, replace_first_conv

__all__ = [
    "ARCHITECTURES",
    "EXPORT_FORMATS",
    "FORMAT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FrozenInfo",
    "MLPHead",
    "ModelSpec",
    "Normalize",
    "NormalizedModel",
    "classifier_head",
    "convert_state_dict",
    "create_model",
    "export_model",
    "first_conv",
    "freeze_stages",
    "head_name",
    "infer_architectures",
    "list_architectures",
    "load_foreign",
    "load_model",
    "num_stages",
    "replace_first_conv",
    "replace_head",
    "save_model",
    "set_train_mode",
    "with_builder",
    "with_normalization",
]
