"""Hugging Face <-> Megatron: Llama-2/3, Mistral and Qwen2 safetensors directories to and from
Megatron legacy checkpoints at any TP/PP/VPP, through the layout/plan/executor machinery.

``to_megatron.hf_to_megatron`` and ``to_hf.megatron_to_hf`` are the two conversions;
``cli`` holds their ``ckpt-hooks`` subcommands.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Report:
    source: str
    target: str
    files: int
    nbytes: int
    seconds: float

    def __str__(self) -> str:
        rate = self.nbytes / max(self.seconds, 1e-9) / 1e6
        return (f"{self.source} -> {self.target}: {self.files} files, "
                f"{self.nbytes / 1e6:.1f} MB in {self.seconds:.2f} s ({rate:.0f} MB/s)")
