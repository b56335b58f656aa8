"""What robust and standard models' representations look like: inversion, class synthesis, saliency (Figure 3)."""

from .grids import image_grid, save_grid
from .perception import class_seeds, feature_distance, invert_representation, saliency, synthesize_class
from .pictures import KINDS, draw_pictures

__all__ = ["KINDS", "class_seeds", "draw_pictures", "feature_distance", "image_grid", "invert_representation",
           "saliency", "save_grid", "synthesize_class"]
