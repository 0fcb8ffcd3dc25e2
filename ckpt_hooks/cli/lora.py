"""The ``ckpt-hooks merge-lora``, ``lora-to-peft`` and ``merge-lora-mindspore`` subcommands
(registered by ckpt_hooks.cli from COMMANDS), with MindSpeed-LLM's and MindFormers' flag names.
Nothing heavy is imported until a command runs."""

from __future__ import annotations

import argparse
import os

from ckpt_hooks.cli.target import (add_layout_arguments, add_vocab_arguments, refuse_flags, reports,
                                   target_from)
from ckpt_hooks.converters.hf.names import LAYERS

_MEGATRON_FLAGS = ("tp", "pp", "vpp", "dp", "num_layer_list")
_HF_FLAGS = ("model_type", "max_shard_size")


def _lora(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lora-load", required=True,
                        help="the LoRA checkpoint: a Megatron checkpoint of lora_A / lora_B tensors only "
                             "(MindSpeed-LLM's --lora-ckpt-filter), at any TP/PP")
    parser.add_argument("--lora-r", type=int, help="LoRA rank (default: what the LoRA run's args record)")
    parser.add_argument("--lora-alpha", type=float, help="LoRA alpha; the update is scaled by alpha / r "
                                                         "(default: what the LoRA run's args record)")
    parser.add_argument("--lora-target-modules", nargs="+",
                        help="linear_qkv linear_proj linear_fc1 linear_fc2, or the legacy query_key_value dense "
                             "dense_h_to_4h dense_4h_to_h (default: what the LoRA run's args record)")


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load-dir", required=True,
                        help="the base Megatron checkpoint (root with the tracker file, or an iter_* dir), "
                             "any TP/PP/VPP")
    _lora(parser)
    parser.add_argument("--save-dir", required=True, help="where to write (must not exist or be empty)")
    parser.add_argument("--save-format", choices=("megatron", "hf"), default="megatron",
                        help="a Megatron checkpoint (weights only: resume with --finetune) or a Hugging Face model")
    add_layout_arguments(parser, default="the base's (--save-format megatron)")
    hf = parser.add_argument_group("--save-format hf")
    hf.add_argument("--model-type", choices=sorted(LAYERS),
                    help="default: qwen2 with q/k/v biases, mistral with an attention window, else llama")
    hf.add_argument("--max-shard-size", help="largest safetensors file (default 5GB)")
    add_vocab_arguments(parser, padding=False)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="files written in parallel")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_merge(args) -> None:
    from ckpt_hooks.converters.lora.merge import HF, merge_lora

    refuse_flags(args, _HF_FLAGS if args.save_format != HF else _MEGATRON_FLAGS, f"--save-format {args.save_format}")
    report = merge_lora(args.load_dir, args.lora_load, args.save_dir, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                        target_modules=args.lora_target_modules, save_format=args.save_format,
                        target=target_from(args), model_type=args.model_type,
                        max_shard_size=args.max_shard_size or "5GB", workers=args.workers, quiet=args.quiet)
    if reports(args.quiet):
        print(f"wrote {args.save_dir}: {report}")


def add_peft_arguments(parser: argparse.ArgumentParser) -> None:
    _lora(parser)
    parser.add_argument("--save-dir", required=True, help="where to write the adapter (must not exist or be empty)")
    parser.add_argument("--model-type", choices=sorted(LAYERS),
                        help="the Hugging Face family of the base (default: as megatron-to-hf picks it)")
    parser.add_argument("--quiet", action="store_true", help="print nothing")


def run_peft(args) -> None:
    from ckpt_hooks.converters.lora.to_peft import lora_to_peft

    report = lora_to_peft(args.lora_load, args.save_dir, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                          target_modules=args.lora_target_modules, model_type=args.model_type)
    if reports(args.quiet):
        print(f"wrote {args.save_dir}: {report}")


def add_mindspore_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load-dir", required=True,
                        help="the MindSpore checkpoint with its adapters: a rank_N/ tree, or one complete file")
    parser.add_argument("--save-dir", required=True, help="where to write (must not exist or be empty)")
    parser.add_argument("--src-strategy-path-or-dir", help="the source's strategy file, or the directory of its "
                                                           "pipeline stages' files (default: one complete file)")
    parser.add_argument("--dst-strategy", help="the target's strategy (default: one complete checkpoint)")
    parser.add_argument("--lora-scaling", type=float, help="the update's scale (default: --lora-alpha / --lora-r)")
    parser.add_argument("--lora-r", type=int, help="LoRA rank, checked against the adapters")
    parser.add_argument("--lora-alpha", type=float, help="LoRA alpha")
    parser.add_argument("--prefix", default="checkpoint_", help="target file names: rank_{r}/{prefix}{r}.{format}")
    parser.add_argument("--format", choices=("ckpt", "safetensors"), help="target format (default: the source's)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="files written in parallel")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_mindspore(args) -> None:
    from ckpt_hooks.converters.lora.mindspore_merge import merge_lora_mindspore

    report = merge_lora_mindspore(args.load_dir, args.save_dir, args.src_strategy_path_or_dir, args.dst_strategy,
                                  lora_scaling=args.lora_scaling, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                                  prefix=args.prefix, output_format=args.format, workers=args.workers,
                                  quiet=args.quiet)
    if reports(args.quiet):
        print(f"wrote {args.save_dir}: {report}")


# name -> (help, add_arguments, run), as ckpt_hooks.cli.COMMANDS.
COMMANDS = {
    "merge-lora": ("merge a LoRA checkpoint into its base Megatron checkpoint; write Megatron at any TP/PP/VPP "
                   "or Hugging Face", add_merge_arguments, run_merge),
    "lora-to-peft": ("write a Megatron LoRA checkpoint as a Hugging Face PEFT adapter", add_peft_arguments, run_peft),
    "merge-lora-mindspore": ("merge the LoRA adapters of a sharded MindSpore checkpoint into its weights",
                             add_mindspore_arguments, run_mindspore),
}
