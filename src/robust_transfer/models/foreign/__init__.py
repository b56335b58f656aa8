"""Other tools' model files: reading them without running pickled code (`reading`), their key layouts
(`layouts`), naming their architecture (`architectures`, `timm_names`) and loading them (`convert`)."""

from .architectures import infer_architectures
from .convert import Converted, convert_state_dict, export_info, load_foreign
from .layouts import parse_layout
from .reading import read_checkpoint, safetensors_header

__all__ = ["Converted", "convert_state_dict", "export_info", "infer_architectures", "load_foreign", "parse_layout",
           "read_checkpoint", "safetensors_header"]
