"""Megatron <-> MindSpeed-Core-MS (MindSpore) checkpoints, weights and distributed-optimizer
state, at any layout on either side (``files`` describes MindSpeed-Core-MS's layout)."""

__all__ = ["megatron_to_mindspore", "mindspore_to_megatron", "tensor_md5"]


def __getattr__(name):
    # Keep the package light (the CLI imports its commands): torch only when a function is used.
    if name == "megatron_to_mindspore":
        from ckpt_hooks.converters.mindspeed.to_mindspore import megatron_to_mindspore
        return megatron_to_mindspore
    if name == "mindspore_to_megatron":
        from ckpt_hooks.converters.mindspeed.to_megatron import mindspore_to_megatron
        return mindspore_to_megatron
    if name == "tensor_md5":
        from ckpt_hooks.converters.mindspeed.files import tensor_md5
        return tensor_md5
    raise AttributeError(name)
