"""Detection and instance segmentation transfer: Faster / Mask R-CNN over a (robust) source's stages."""

from .api import DetectResult, detect, load_detector
from .config import DetectConfig
from .detector import DetectorShape, build_detector
from .record import DetectionRecord

__all__ = ["DetectConfig", "DetectResult", "DetectionRecord", "DetectorShape", "build_detector", "detect",
           "load_detector"]
