"""Megatron <-> MindSpeed-Core-MS (MindSpore) checkpoints, weights and distributed-optimizer
state, at any layout on either side (``files`` describes MindSpeed-Core-MS's layout)."""

from ckpt_hooks.mindspeed.files import tensor_md5
from ckpt_hooks.mindspeed.to_megatron import mindspore_to_megatron
from ckpt_hooks.mindspeed.to_mindspore import megatron_to_mindspore

__all__ = ["megatron_to_mindspore", "mindspore_to_megatron", "tensor_md5"]
