"""The ``ckpt-hooks hf-to-megatron`` and ``ckpt-hooks megatron-to-hf`` subcommands (registered by
ckpt_hooks.cli from COMMANDS). Nothing heavy is imported until a command runs."""

from __future__ import annotations

import argparse
import os

from ckpt_hooks.cli.target import add_layout_arguments, add_vocab_arguments, positive, reports, target_from
from ckpt_hooks.converters.hf.names import LAYERS, LOCAL, TRANSFORMER_ENGINE

DTYPES = ("bf16", "fp16", "fp32")


def add_common_arguments(parser: argparse.ArgumentParser, load_help: str, padding: bool = False) -> None:
    """--load-dir, --save-dir, --params-dtype, the vocabulary (``padding``: how to pad it too), --workers, --quiet."""
    parser.add_argument("--load-dir", required=True, help=load_help)
    parser.add_argument("--save-dir", required=True, help="where to write (must not exist or be empty)")
    parser.add_argument("--params-dtype", choices=DTYPES, help="cast the weights (default: keep their dtype)")
    add_vocab_arguments(parser, padding)
    parser.add_argument("--workers", type=positive, default=min(4, os.cpu_count() or 1),
                        help="files written in parallel")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def target(args):
    """The Target the flags give (layout, vocabulary, dtype, layer spec, noop layers)."""
    return target_from(args, params_dtype=args.params_dtype, layer_spec=getattr(args, "transformer_impl", None),
                       noop_layers=getattr(args, "noop_layers", None))


def layer_indices(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(i) for i in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


def add_hf_to_megatron_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "Hugging Face model directory (config.json, model.safetensors or an index "
                                 "and shards)", padding=True)
    add_megatron_target_arguments(parser)


def add_megatron_target_arguments(parser: argparse.ArgumentParser) -> None:
    """The Megatron checkpoint to write: layout, layer spec, release."""
    add_layout_arguments(parser, default="1")
    parser.add_argument("--transformer-impl", choices=(TRANSFORMER_ENGINE, LOCAL), default=TRANSFORMER_ENGINE,
                        help="the layer spec whose names to write (as Megatron-LM's --transformer-impl)")
    parser.add_argument("--release", action="store_true", help="write release/ instead of iter_0000001/")
    parser.add_argument("--moe-grouped-gemm", action="store_true", default=None,
                        help="write the experts as megatron-core's legacy GroupedMLP (weight1/weight2, "
                             "Megatron-LM's --moe-grouped-gemm with the local layer spec)")
    parser.add_argument("--noop-layers", type=layer_indices,
                        help="MindSpeed-LLM's noop layers to pad the model with, global layer numbers of the "
                             "padded model (e.g. 46,47 turn 46 layers into 48)")


def to_megatron_options(args) -> dict:
    """The arguments of hf_to_megatron (and the other *_to_megatron) that the flags give."""
    return dict(target=target(args), release=args.release, workers=args.workers, quiet=args.quiet)


def run_hf_to_megatron(args) -> None:
    from ckpt_hooks.converters.hf.to_megatron import hf_to_megatron

    report = hf_to_megatron(args.load_dir, args.save_dir, **to_megatron_options(args))
    if reports(args.quiet):
        print(f"wrote {args.save_dir}: {report}")


def add_megatron_to_hf_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "Megatron legacy checkpoint (root with the tracker file, or an iter_* dir), "
                                 "any TP/PP/VPP")
    parser.add_argument("--make-vocab-size-divisible-by", type=positive,
                        help="the checkpoint's vocabulary divisor, when its args lack it and the inferred one is wrong")
    parser.add_argument("--model-type", choices=sorted(LAYERS),
                        help="Hugging Face family (default: qwen2 with q/k/v biases, mistral with an attention "
                             "window, else llama)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MiB")


def run_megatron_to_hf(args) -> None:
    from ckpt_hooks.converters.hf.to_hf import megatron_to_hf

    report = megatron_to_hf(args.load_dir, args.save_dir, target(args), model_type=args.model_type,
                            max_shard_size=args.max_shard_size, workers=args.workers, quiet=args.quiet)
    if reports(args.quiet):
        print(f"wrote {args.save_dir}: {report}")


# name -> (help, add_arguments, run), as ckpt_hooks.cli.COMMANDS.
COMMANDS = {
    "hf-to-megatron": ("convert a Hugging Face Llama/Mistral/Qwen2 model to a Megatron checkpoint at any TP/PP/VPP",
                       add_hf_to_megatron_arguments, run_hf_to_megatron),
    "megatron-to-hf": ("convert a Megatron checkpoint at any TP/PP/VPP to a Hugging Face Llama/Mistral/Qwen2 model",
                       add_megatron_to_hf_arguments, run_megatron_to_hf),
}
