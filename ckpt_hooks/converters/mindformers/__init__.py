"""MindFormers (the legacy Llama family of ``mindformers/models/llama``: Llama, Qwen2-like with
q/k/v biases) <-> Megatron and <-> Hugging Face, through the ``ckpt_hooks.converters.hf`` machinery with
MindFormers' name tables (``names``). MindFormers checkpoints are MindSpore safetensors.

``convert`` holds the four conversions, ``cli`` their ``ckpt-hooks`` subcommands.
"""
