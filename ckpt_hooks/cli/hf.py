"""The ``ckpt-hooks hf-to-megatron`` and ``ckpt-hooks megatron-to-hf`` subcommands (registered by
ckpt_hooks.cli from COMMANDS). Nothing heavy is imported until a command runs."""

from __future__ import annotations

import argparse
import os

from ckpt_hooks.converters.hf.names import LAYERS, LOCAL, TRANSFORMER_ENGINE
from ckpt_hooks.algebra.spec import parse_layer_list

DTYPES = ("bf16", "fp16", "fp32")


def torch_dtype(name: str | None):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(name)


def add_common_arguments(parser: argparse.ArgumentParser, load_help: str) -> None:
    parser.add_argument("--load-dir", required=True, help=load_help)
    parser.add_argument("--save-dir", required=True, help="where to write (must not exist or be empty)")
    parser.add_argument("--params-dtype", choices=DTYPES, help="cast the weights (default: keep their dtype)")
    parser.add_argument("--true-vocab-size", type=int, help="real vocabulary rows; rows past it are dropped")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="files written in parallel")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_hf_to_megatron_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "Hugging Face model directory (config.json, model.safetensors or an index "
                                 "and shards)")
    add_megatron_target_arguments(parser)


def add_megatron_target_arguments(parser: argparse.ArgumentParser) -> None:
    """The Megatron checkpoint to write: layout, layer spec, vocabulary padding."""
    parser.add_argument("--target-tensor-parallel-size", type=int, default=1)
    parser.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--target-virtual-pipeline-parallel-size", type=int, help="virtual pipeline chunks per stage")
    parser.add_argument("--num-layer-list", type=parse_layer_list,
                        help="layers per pipeline stage for uneven splits, e.g. 1,3")
    parser.add_argument("--transformer-impl", choices=(TRANSFORMER_ENGINE, LOCAL), default=TRANSFORMER_ENGINE,
                        help="the layer spec whose names to write (as Megatron-LM's --transformer-impl)")
    vocab = parser.add_mutually_exclusive_group()
    vocab.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                       help="pad the vocabulary to a multiple of this x TP (Megatron-LM's rule)")
    vocab.add_argument("--padded-vocab-size", type=int, help="pad the vocabulary to exactly this many rows")
    parser.add_argument("--release", action="store_true", help="write release/ instead of iter_0000001/")


def to_megatron_options(args) -> dict:
    """The keyword arguments of hf_to_megatron (and external_to_megatron) that the flags give."""
    return dict(target_tp=args.target_tensor_parallel_size, target_pp=args.target_pipeline_parallel_size,
                target_vpp=args.target_virtual_pipeline_parallel_size, num_layer_list=args.num_layer_list,
                layer_spec=args.transformer_impl, params_dtype=torch_dtype(args.params_dtype),
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                padded_vocab_size=args.padded_vocab_size, true_vocab_size=args.true_vocab_size,
                release=args.release, workers=args.workers, quiet=args.quiet)


def run_hf_to_megatron(args) -> None:
    from ckpt_hooks.converters.hf.to_megatron import hf_to_megatron

    report = hf_to_megatron(args.load_dir, args.save_dir, **to_megatron_options(args))
    if not args.quiet:
        print(f"wrote {args.save_dir}: {report}")


def add_megatron_to_hf_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "Megatron legacy checkpoint (root with the tracker file, or an iter_* dir), "
                                 "any TP/PP/VPP")
    parser.add_argument("--model-type", choices=sorted(LAYERS),
                        help="Hugging Face family (default: qwen2 with q/k/v biases, mistral with an attention "
                             "window, else llama)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MiB")


def run_megatron_to_hf(args) -> None:
    from ckpt_hooks.converters.hf.to_hf import megatron_to_hf

    report = megatron_to_hf(args.load_dir, args.save_dir, model_type=args.model_type,
                            params_dtype=torch_dtype(args.params_dtype), max_shard_size=args.max_shard_size,
                            true_vocab_size=args.true_vocab_size, workers=args.workers, quiet=args.quiet)
    if not args.quiet:
        print(f"wrote {args.save_dir}: {report}")


# name -> (help, add_arguments, run), as ckpt_hooks.cli.COMMANDS.
COMMANDS = {
    "hf-to-megatron": ("convert a Hugging Face Llama/Mistral/Qwen2 model to a Megatron checkpoint at any TP/PP/VPP",
                       add_hf_to_megatron_arguments, run_hf_to_megatron),
    "megatron-to-hf": ("convert a Megatron checkpoint at any TP/PP/VPP to a Hugging Face Llama/Mistral/Qwen2 model",
                       add_megatron_to_hf_arguments, run_megatron_to_hf),
}
