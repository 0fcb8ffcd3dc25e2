"""MindSpore strategy files and the boxes they give each rank: the layout algebra
(``algebra.mindspore_layout``) and the file reader (``formats.mindspore_strategy``) under one name."""

from ckpt_hooks.algebra.mindspore_layout import (ParamLayout, Strategy, box, check_shape, global_shape, pieces,
                                                 rank_boxes, splits, whole)
from ckpt_hooks.formats.mindspore_strategy import read_strategy

__all__ = ["ParamLayout", "Strategy", "box", "check_shape", "global_shape", "pieces", "rank_boxes", "read_strategy",
           "splits", "whole"]
