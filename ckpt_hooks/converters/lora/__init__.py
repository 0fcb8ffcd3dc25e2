"""LoRA: merging adapters into their base model, and exporting them.

* ``merge.merge_lora``: a Megatron LoRA checkpoint (MindSpeed-LLM's) into its base Megatron
  checkpoint, each at any TP/PP, written as Megatron at any layout or as Hugging Face;
* ``to_peft.lora_to_peft``: the same adapters as a Hugging Face PEFT adapter;
* ``mindspore_merge.merge_lora_mindspore``: the adapters of a sharded MindSpore checkpoint
  (MindFormers') into its weights, for any target strategy;
* ``adapter``: reading Megatron adapters into the logical form of the weights they adapt;
  ``cli``: the commands.
"""
