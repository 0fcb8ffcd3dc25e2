"""The target flags every converting command shares, and the ``Target`` they build.

    --target-tensor-parallel-size (--tp-size)      --target-pipeline-parallel-size (--pp-size)
    --target-virtual-pipeline-parallel-size (--vpp-size) | --num-layers-per-virtual-pipeline-stage
    --target-data-parallel-size (--dp-size)
    --num-layer-list 1,3                                     uneven pipeline stages
    --target-expert-model-parallel-size (--target-expert-parallel-size, --ep-size)
    --target-expert-tensor-parallel-size (--etp-size)        mixtures of experts
    [vocabulary]  --make-vocab-size-divisible-by | --padded-vocab-size, --true-vocab-size

The short spellings are MindSpeed-Core-MS's, ``--target-expert-parallel-size`` MindSpeed-LLM's. Sizes must be positive (argparse says so, naming
the flag); their fit to the model is checked by ``Target.layout``."""

from __future__ import annotations

import argparse
import os

from ckpt_hooks.algebra.spec import parse_layer_list
from ckpt_hooks.algebra.target import FLAGS, Target
from ckpt_hooks.errors import CheckpointError


def reports(quiet: bool) -> bool:
    """Whether this process prints what a command wrote: unless ``--quiet``, and under torchrun
    rank 0 alone (it has every rank's part of the report)."""
    return not quiet and os.environ.get("RANK", "0") == "0"


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def layer_list(text: str) -> tuple[int, ...]:
    try:
        stages = parse_layer_list(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer counts, got {text!r}") from None
    if min(stages) < 1:
        raise argparse.ArgumentTypeError(f"every stage needs at least one layer, got {text!r}")
    return stages


def add_layout_arguments(parser: argparse.ArgumentParser, default: str = "the source's") -> None:
    """The target layout's sizes (``default`` says what an unset size means)."""
    group = parser.add_argument_group("target layout")
    group.add_argument("--target-tensor-parallel-size", "--tp-size", dest="tp", type=positive,
                       help=f"default: {default}")
    group.add_argument("--target-pipeline-parallel-size", "--pp-size", dest="pp", type=positive,
                       help=f"default: {default}")
    group.add_argument("--target-virtual-pipeline-parallel-size", "--vpp-size", dest="vpp", type=positive,
                       help="virtual pipeline chunks per stage (default: the source's if PP is unchanged, else 1)")
    group.add_argument("--num-layers-per-virtual-pipeline-stage", dest="layers_per_virtual_stage", type=positive,
                       help="virtual pipeline stages given as layers per virtual stage (MindSpeed-LLM's spelling)")
    group.add_argument("--target-data-parallel-size", "--dp-size", dest="dp", type=positive,
                       help="shapes the optimizer's buckets when there are several (default: fill the source's world)")
    group.add_argument("--num-layer-list", type=layer_list, help="layers per pipeline stage for uneven splits, e.g. 1,3")
    group.add_argument("--target-expert-model-parallel-size", "--target-expert-parallel-size", "--ep-size", dest="ep",
                       type=positive, help=f"experts: whole experts per expert rank (default: {default})")
    group.add_argument("--target-expert-tensor-parallel-size", "--etp-size", dest="etp", type=positive,
                       help="experts: tensor parallel size inside each expert (default: the source's; TP where "
                            "that was the source's TP)")


def add_vocab_arguments(parser: argparse.ArgumentParser, padding: bool = True) -> None:
    """The vocabulary: its real rows, and (``padding``) how the target pads it."""
    group = parser.add_argument_group("vocabulary")
    group.add_argument("--true-vocab-size", type=positive,
                       help="real vocabulary rows, when the saved args do not tell (rows past it are padding)")
    if padding:
        pad = group.add_mutually_exclusive_group()
        pad.add_argument("--make-vocab-size-divisible-by", type=positive,
                         help="pad the vocabulary to a multiple of this x TP, Megatron-LM's rule "
                              "(default: the source's, inferred from its padded size if its args lack it)")
        pad.add_argument("--padded-vocab-size", type=positive, help="pad the vocabulary to exactly this many rows")


def target_from(args, **more):
    """The Target the parsed flags give (those a command does not have stay unset)."""
    given = {name: getattr(args, name, None) for name in
             ("tp", "pp", "vpp", "dp", "ep", "etp", "num_layer_list", "make_vocab_size_divisible_by", "padded_vocab_size",
              "true_vocab_size", "moe_grouped_gemm", "layers_per_virtual_stage")}
    return Target(**given, **more)


def refuse_flags(args, names, where: str) -> None:
    """Fail, naming the first of ``names`` given, for a flag that does not apply ``where`` says."""
    given = [name for name in names if getattr(args, name) not in (None, False)]
    if given:
        flag = FLAGS.get(given[0], "--" + given[0].replace("_", "-"))
        raise CheckpointError(args.load_dir, f"{flag} does not apply to {where}")
