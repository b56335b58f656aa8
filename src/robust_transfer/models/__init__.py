"""Models: architecture registry, normalisation wrapper, head lookup and our model file format.

Every model handed around takes images in [0, 1], NCHW, and holds its own normalisation in
front (`NormalizedModel`), so an eps means the same for every model.
"""

from .checkpoint import FORMAT, load_model, save_model
from .normalization import IMAGENET_MEAN, IMAGENET_STD, Normalize, NormalizedModel
from .registry import ARCHITECTURES, create_model, list_architectures, with_normalization
from .spec import ModelSpec
from .surgery import classifier_head, first_conv, replace_first_conv

__all__ = [
    "ARCHITECTURES",
    "FORMAT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ModelSpec",
    "Normalize",
    "NormalizedModel",
    "classifier_head",
    "create_model",
    "first_conv",
    "list_architectures",
    "load_model",
    "replace_first_conv",
    "save_model",
    "with_normalization",
]

from .export import EXPORT_FORMATS, export_model  # noqa: E402  (checkpoint import/export, robust_transfer.zoo)
from .legacy import convert_state_dict, infer_architectures, load_foreign  # noqa: E402

__all__ += ["EXPORT_FORMATS", "convert_state_dict", "export_model", "infer_architectures", "load_foreign"]

# Stages for partial transfer and new heads (`stages()` itself stays in models.stages, so that the
# package attribute `stages` keeps naming the module).
from .stages import (  # noqa: E402
    FrozenInfo,
    MLPHead,
    freeze_stages,
    head_name,
    num_stages,
    replace_head,
    set_train_mode,
)

__all__ += ["FrozenInfo", "MLPHead", "freeze_stages", "head_name", "num_stages", "replace_head", "set_train_mode"]
