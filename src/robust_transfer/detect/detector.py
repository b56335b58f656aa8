"""Faster R-CNN and Mask R-CNN (torchvision's) over a source model's stages, as the paper's detection transfers.

The source's own normalisation becomes the detector's ``image_mean`` / ``image_std``: inputs stay in
[0, 1], as everywhere in this project. ``trainable_stages`` is partial transfer for detection: the last
K stages of the source train with the pyramid and heads, the others stay as the source made them
(detectron2's default, and the paper's, freezes the stem and the first stage: K = stages - 1).
Anchors scale with each level's stride (``anchor_scale`` x stride, three aspect ratios), so a source
with a stride-1 stem (small_resnet, CIFAR ResNets) gets anchors that fit its maps.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from ..errors import RobustTransferError
from ..models import NormalizedModel
from ..models.stages import classifier_of, freeze_stages, head_name
from .backbone import StageBackbone, freeze_batchnorm, stage_maps


@dataclass(frozen=True)
class DetectorShape:
    """The detector's sizes: pyramid width, box-head width, input resize bounds and anchors."""

    fpn_channels: int = 256
    representation: int = 1024      # the box head's two fully connected layers
    min_size: int = 800             # images are resized so that their short side is this (torchvision, detectron2)
    max_size: int = 1333
    anchor_scale: float = 8.0       # anchor side = scale x the level's stride (32 px at stride 4, as detectron2)
    roi_samples: int = 512          # proposals per image the box head trains on (detectron2: 512; fewer objects, fewer)


def build_detector(source: NormalizedModel, num_classes: int, *, task: str = "detection",
                   trainable_stages: int | None = None, shape: DetectorShape = DetectorShape()) -> nn.Module:
    """A Faster R-CNN (``task="detection"``) or Mask R-CNN (``"instance-segmentation"``) for ``num_classes``
    object classes (the background is added) over a copy of ``source``'s stages.

    ``trainable_stages`` (default: all but the first) last stages train; BatchNorm is frozen everywhere.
    """
    if not isinstance(source, NormalizedModel):
        raise RobustTransferError("the source model must carry its normalisation (load_model or with_normalization)")
    source = copy.deepcopy(source).cpu().eval()
    in_channels = source.spec.in_channels
    maps = stage_maps(source, in_channels)
    count = len(maps.ends)
    trainable = count - 1 if trainable_stages is None else trainable_stages
    if not 0 <= trainable <= count:
        raise RobustTransferError(f"--trainable-stages must be between 0 and {count} for {source.spec.arch} "
                                  f"(its stages end at {', '.join(maps.ends)}), got {trainable}")
    classifier = classifier_of(source)
    freeze_stages(source, count - trainable)
    try:
        for parameter in classifier.get_submodule(head_name(classifier)).parameters():
            parameter.requires_grad_(False)  # the classifier's head computes nothing the detector uses
    except RobustTransferError:
        pass  # a backbone without a head
    freeze_batchnorm(classifier)
    backbone = StageBackbone(classifier, maps.ends, maps.channels, shape.fpn_channels)
    levels = [*maps.strides, maps.strides[-1] * 2]  # the max-pooled level above the last stage
    anchors = AnchorGenerator(tuple((max(1, round(shape.anchor_scale * s)),) for s in levels),
                              ((0.5, 1.0, 2.0),) * len(levels))
    names = [str(i) for i in range(count)]
    mean = source.normalize.mean.flatten().tolist()
    std = source.normalize.std.flatten().tolist()
    common = dict(rpn_anchor_generator=anchors, min_size=shape.min_size, max_size=shape.max_size, image_mean=mean,
                  image_std=std, box_batch_size_per_image=shape.roi_samples,
                  box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
                  box_head=TwoMLPHead(shape.fpn_channels * 7 * 7, shape.representation),
                  box_predictor=FastRCNNPredictor(shape.representation, num_classes + 1))
    if task == "detection":
        return FasterRCNN(backbone, **common)
    if task == "instance-segmentation":
        width = shape.fpn_channels
        return MaskRCNN(backbone, mask_roi_pool=MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2),
                        mask_head=MaskRCNNHeads(width, (width,) * 4, 1),
                        mask_predictor=MaskRCNNPredictor(width, width, num_classes + 1), **common)
    raise RobustTransferError(f"unknown task {task!r}: use detection or instance-segmentation")
