"""The ``ckpt-hooks`` subcommands between MindFormers, Megatron and Hugging Face (registered by
ckpt_hooks.cli from COMMANDS). Nothing heavy is imported until a command runs."""

from __future__ import annotations

import argparse

from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.cli.target import reports
from ckpt_hooks.cli.hf import add_common_arguments, add_megatron_target_arguments, target, to_megatron_options

_MINDFORMERS = "MindFormers safetensors: one file, or a directory of them (with param_name_map.json)"
_ARCHITECTURE = ("num_query_groups", "rope_theta", "norm_eps", "max_position_embeddings")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "the model (MindFormers' safetensors do not describe it; default: the config.json beside --load-dir)")
    given = group.add_mutually_exclusive_group()
    given.add_argument("--config", help="a Hugging Face config.json (llama or qwen2), or its directory")
    given.add_argument("--num-attention-heads", type=int,
                       help="instead of --config: the attention heads; the sizes are read from the tensors")
    group.add_argument("--num-query-groups", type=int, help="KV heads (default: from the k rows)")
    group.add_argument("--rope-theta", type=float, help="RoPE base (default 10000)")
    group.add_argument("--norm-eps", type=float, help="RMSNorm epsilon (default 1e-5)")
    group.add_argument("--max-position-embeddings", type=int, help="the longest sequence (default 4096)")


def _model(args) -> dict:
    """config= and architecture= of the conversions, from the flags."""
    from ckpt_hooks.converters.mindformers.config import Architecture

    given = {name: getattr(args, name) for name in _ARCHITECTURE if getattr(args, name) is not None}
    if args.num_attention_heads is None:
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise CheckpointError(args.load_dir, f"{flags}: given without --num-attention-heads")
        return {"config": args.config, "architecture": None}
    return {"config": None, "architecture": Architecture(args.num_attention_heads, **given)}


def _add_output_arguments(parser: argparse.ArgumentParser, load_help: str, fused: bool) -> None:
    add_common_arguments(parser, load_help)
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MiB")
    if fused:
        parser.add_argument("--qkv-concat", action="store_true",
                            help="MindFormers' qkv_concat layout: fused w_qkv and w_gate_hidden")


def _report(args, report) -> None:
    if reports(args.quiet):
        print(f"wrote {args.save_dir}: {report}")


def add_mindformers_to_megatron_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, _MINDFORMERS + ", qkv_concat or not", padding=True)
    _add_model_arguments(parser)
    add_megatron_target_arguments(parser)


def run_mindformers_to_megatron(args) -> None:
    from ckpt_hooks.converters.mindformers.convert import mindformers_to_megatron

    _report(args, mindformers_to_megatron(args.load_dir, args.save_dir, **_model(args), **to_megatron_options(args)))


def add_megatron_to_mindformers_arguments(parser: argparse.ArgumentParser) -> None:
    _add_output_arguments(parser, "Megatron legacy checkpoint (root with the tracker file, or an iter_* dir), "
                                  "any TP/PP/VPP", fused=True)


def run_megatron_to_mindformers(args) -> None:
    from ckpt_hooks.converters.mindformers.convert import megatron_to_mindformers

    _report(args, megatron_to_mindformers(args.load_dir, args.save_dir, target(args), qkv_concat=args.qkv_concat,
                                          max_shard_size=args.max_shard_size, workers=args.workers, quiet=args.quiet))


def add_hf_to_mindformers_arguments(parser: argparse.ArgumentParser) -> None:
    _add_output_arguments(parser, "Hugging Face Llama or Qwen2 model directory", fused=True)


def run_hf_to_mindformers(args) -> None:
    from ckpt_hooks.converters.mindformers.convert import hf_to_mindformers

    _report(args, hf_to_mindformers(args.load_dir, args.save_dir, target(args), qkv_concat=args.qkv_concat,
                                    max_shard_size=args.max_shard_size, workers=args.workers, quiet=args.quiet))


def add_mindformers_to_hf_arguments(parser: argparse.ArgumentParser) -> None:
    _add_output_arguments(parser, _MINDFORMERS + ", qkv_concat or not", fused=False)
    _add_model_arguments(parser)


def run_mindformers_to_hf(args) -> None:
    from ckpt_hooks.converters.mindformers.convert import mindformers_to_hf

    _report(args, mindformers_to_hf(args.load_dir, args.save_dir, target(args), **_model(args),
                                    max_shard_size=args.max_shard_size, workers=args.workers, quiet=args.quiet))


# name -> (help, add_arguments, run), as ckpt_hooks.cli.COMMANDS.
COMMANDS = {
    "mindformers-to-megatron": ("convert MindFormers Llama/Qwen2 safetensors to a Megatron checkpoint at any TP/PP/VPP",
                                add_mindformers_to_megatron_arguments, run_mindformers_to_megatron),
    "megatron-to-mindformers": ("convert a Megatron checkpoint at any TP/PP/VPP to MindFormers Llama/Qwen2 safetensors",
                                add_megatron_to_mindformers_arguments, run_megatron_to_mindformers),
    "hf-to-mindformers": ("convert a Hugging Face Llama/Qwen2 model to MindFormers safetensors",
                          add_hf_to_mindformers_arguments, run_hf_to_mindformers),
    "mindformers-to-hf": ("convert MindFormers Llama/Qwen2 safetensors to a Hugging Face model",
                          add_mindformers_to_hf_arguments, run_mindformers_to_hf),
}
