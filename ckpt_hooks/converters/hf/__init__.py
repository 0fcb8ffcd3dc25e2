"""Hugging Face <-> Megatron: Llama-2/3, Mistral and Qwen2 safetensors directories to and from
Megatron legacy checkpoints at any TP/PP/VPP, through the layout/plan/executor machinery.

``to_megatron.hf_to_megatron`` and ``to_hf.megatron_to_hf`` are the two conversions;
``cli`` holds their ``ckpt-hooks`` subcommands.
"""
