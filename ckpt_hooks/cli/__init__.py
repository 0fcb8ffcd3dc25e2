"""``ckpt-hooks``: convert and inspect checkpoints from the command line."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import signal
import sys

from ckpt_hooks import __version__
from ckpt_hooks.cli.target import (add_layout_arguments, add_vocab_arguments, positive, refuse_flags, reports,
                                   target_from)
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.cli.hf import COMMANDS as HF_COMMANDS
from ckpt_hooks.cli.lora import COMMANDS as LORA_COMMANDS
from ckpt_hooks.cli.mindformers import COMMANDS as MINDFORMERS_COMMANDS
from ckpt_hooks.cli.mindspeed import COMMANDS as MINDSPEED_COMMANDS


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load-dir", required=True,
                        help="source checkpoint: Megatron (root with the tracker file, or an iter_* dir) or "
                             "MindSpore (a rank_N/ tree, or one .ckpt/.safetensors file)")
    parser.add_argument("--save-dir", required=True, help="where to write the converted checkpoint (must not exist or be empty)")
    add_layout_arguments(parser)
    parser.add_argument("--convert-param-only", action="store_true",
                        help="convert the model weights only, not the distributed optimizer's state")
    parser.add_argument("--target-ckpt-format", choices=("torch", "torch_dist"),
                        help="Megatron format to write: legacy torch (mp_rank_* files) or torch_dist "
                             "(Megatron-LM's default; optimizer state as dp_reshardable). Default: the source's")
    parser.add_argument("--moe-grouped-gemm", action=argparse.BooleanOptionalAction,
                        help="experts as megatron-core's legacy GroupedMLP (weight1/weight2, Megatron-LM's "
                             "--moe-grouped-gemm with the local layer spec), or with --no-moe-grouped-gemm as "
                             "SequentialMLP (local_experts.*). Default: the source's")
    add_vocab_arguments(parser, padding=False)
    parser.add_argument("--make-vocab-size-divisible-by", type=positive,
                        help="the source's vocabulary divisor, when its args lack it and the inferred one is wrong")
    parser.add_argument("--workers", "--process-num", type=int, default=min(4, os.cpu_count() or 1),
                        help="target files built in parallel")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (bytes per target file, reads per source file, peak memory) and stop")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty save directory (kept until the new output is complete; never "
                             "the checkpoint being read)")
    parser.add_argument("--resume", action="store_true",
                        help="finish a conversion that was killed: reuse the complete files it staged beside "
                             "--save-dir (checked by CRC-32) and write the rest (Megatron output)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    mindspore = parser.add_argument_group("MindSpore checkpoints (mindspore.transform_checkpoints' arguments)")
    mindspore.add_argument("--src-strategy-path-or-dir",
                           help="the source's strategy file, or the directory of its pipeline stages' files "
                                "(default: the source is one complete checkpoint)")
    mindspore.add_argument("--dst-strategy", help="the target's strategy file or directory (default: one complete "
                                                  "checkpoint)")
    mindspore.add_argument("--prefix", help="target file names: rank_{r}/{prefix}{r}.{format} (default: checkpoint_)")
    mindspore.add_argument("--format", choices=("ckpt", "safetensors"), help="target format (default: the source's)")


# The flags of one framework's conversion, refused for the other's checkpoints.
_MEGATRON_ONLY = ("tp", "pp", "vpp", "dp", "num_layer_list", "convert_param_only", "true_vocab_size",
                  "make_vocab_size_divisible_by", "target_ckpt_format", "resume", "moe_grouped_gemm",
                  "layers_per_virtual_stage")
_MINDSPORE_ONLY = ("prefix", "format")


def run_convert(args) -> None:
    from ckpt_hooks.formats.atomic import refuse_non_empty, replacing

    if args.dry_run:
        _dry_run(args)
    elif args.overwrite:
        refuse_non_empty(args.save_dir, sources=[args.load_dir], overwrite=True)
        with replacing(args.save_dir):
            _convert(args)
    else:
        _convert(args)


def _convert(args) -> None:
    from ckpt_hooks.mindspore.transform import is_mindspore_source

    if args.src_strategy_path_or_dir or args.dst_strategy or is_mindspore_source(args.load_dir):
        refuse_flags(args, _MEGATRON_ONLY, "a MindSpore checkpoint")
        run_mindspore_convert(args)
        return
    refuse_flags(args, _MINDSPORE_ONLY, "a Megatron checkpoint")
    from ckpt_hooks.megatron.conversion import convert

    report = convert(args.load_dir, args.save_dir, target_from(args), convert_param_only=args.convert_param_only,
                     workers=args.workers, quiet=args.quiet, ckpt_format=args.target_ckpt_format, resume=args.resume)
    if reports(args.quiet):
        print(f"wrote {args.save_dir}: {report}")


def _dry_run(args) -> None:
    from ckpt_hooks.megatron.conversion import dry_run, plan_megatron
    from ckpt_hooks.mindspore.transform import is_mindspore_source

    if args.src_strategy_path_or_dir or args.dst_strategy or is_mindspore_source(args.load_dir):
        raise CheckpointError(args.load_dir, "--dry-run plans Megatron checkpoints only, for now")
    print(dry_run(plan_megatron(args.load_dir, target_from(args), convert_param_only=args.convert_param_only),
                  args.workers, args.target_ckpt_format))


def run_mindspore_convert(args) -> None:
    from ckpt_hooks.mindspore.transform import DEFAULT_PREFIX, transform_checkpoints

    report = transform_checkpoints(args.load_dir, args.save_dir, args.src_strategy_path_or_dir, args.dst_strategy,
                                   prefix=args.prefix or DEFAULT_PREFIX, output_format=args.format,
                                   process_num=args.workers, quiet=args.quiet)
    if reports(args.quiet):
        print(f"wrote {args.save_dir}: {report}")


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("load_dir", help="checkpoint root or iter_* directory")
    parser.add_argument("--tensors", action="store_true", help="list every tensor of every file")
    parser.add_argument("--json", action="store_true", help="print one JSON object (layout, model, per-file tensors)")


def run_inspect(args) -> None:
    from ckpt_hooks.megatron.inspection import describe, summary

    if args.json:
        print(json.dumps(summary(args.load_dir, tensors=args.tensors), indent=1))
    else:
        print(describe(args.load_dir, tensors=args.tensors))


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load-dir", required=True, help="checkpoint root or iter_* directory")
    parser.add_argument("--save-dir", required=True, help="directory for the JSON files (must not exist or be empty)")
    parser.add_argument("--data-parallel-size", type=int, help="default: the checkpoint's")


def run_export(args) -> None:
    from ckpt_hooks.megatron.export import export_param_maps

    written = export_param_maps(args.load_dir, args.save_dir, dp=args.data_parallel_size)
    if reports(False):
        print(f"wrote {len(written)} param_map files to {args.save_dir}")


def add_combine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strategy-dir", required=True,
                        help="the opt_shard_info directory (dist_opt_shard_info*.json of every DP group)")
    parser.add_argument("--checkpoint-dir", required=True, help="the rank_N/ directories of the sharded checkpoint")
    parser.add_argument("--output-dir", required=True, help="where to write (must not exist or be empty)")
    parser.add_argument("--src-format", choices=("ckpt", "safetensors"), default="ckpt")
    parser.add_argument("--dst-format", choices=("ckpt", "safetensors"), default="ckpt")
    parser.add_argument("--copy-to-all-dp-ranks", action="store_true",
                        help="write the merged file for every rank of a DP group, not only its first")
    parser.add_argument("--rank-section", type=int, nargs=2, metavar=("START", "END"), default=(None, None),
                        help="only the DP groups whose first rank is in [START, END)")
    parser.add_argument("--no-save-optim", action="store_true",
                        help="the fp32 parameters only: no Adam moments, step or learning rate")
    parser.add_argument("--max-process-limit", "--max-proccess-limit", dest="workers", type=int,
                        default=min(4, os.cpu_count() or 1), help="DP groups merged in parallel")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_combine(args) -> None:
    from ckpt_hooks.mindspore.dp_zero import combine_dp_zero

    written = combine_dp_zero(args.strategy_dir, args.checkpoint_dir, args.output_dir, src_format=args.src_format,
                              dst_format=args.dst_format, copy_to_all_dp_ranks=args.copy_to_all_dp_ranks,
                              rank_section=tuple(args.rank_section), no_save_optim=args.no_save_optim,
                              workers=args.workers, quiet=args.quiet)
    if reports(args.quiet):
        print(f"wrote {len(written)} merged files to {args.output_dir}")


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("first", help="a Megatron checkpoint (legacy or torch_dist; root or iter_* directory), a "
                                      "MindSpeed-Core-MS one (pt_meta beside it), or a MindSpore one (a rank_N/ tree "
                                      "or one file)")
    parser.add_argument("second", nargs="?",
                        help="another one, at any layout and in either format, or a Hugging Face directory "
                             "(weights); without it, FIRST alone is checked against its recorded CRC-32s and manifest")
    parser.add_argument("--src-strategy-path-or-dir", dest="first_strategy", metavar="STRATEGY",
                        help="FIRST is a MindSpore checkpoint saved under this strategy file or directory")
    parser.add_argument("--dst-strategy", dest="second_strategy", metavar="STRATEGY",
                        help="SECOND is a MindSpore checkpoint saved under this strategy file or directory")
    parser.add_argument("--weights-only", action="store_true", help="compare the weights, not the optimizer state")
    parser.add_argument("--json", action="store_true", help="print the certificate as one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_verify(args) -> None:
    from ckpt_hooks.verify import check, verify

    quiet = args.quiet or args.json
    certificate = verify(args.first, args.second, weights_only=args.weights_only, quiet=quiet,
                         strategies=(args.first_strategy, args.second_strategy)) if args.second else \
        check(args.first, quiet=quiet)
    print(json.dumps(certificate.to_json(), indent=1) if args.json else certificate)
    if not certificate.equal:
        raise SystemExit(1)


COMMANDS = {
    "convert": ("reshard a Megatron checkpoint to another TP/PP/VPP layout, or a MindSpore one to another strategy",
                add_convert_arguments, run_convert),
    "inspect": ("describe a checkpoint: format, layout, model, files", add_inspect_arguments, run_inspect),
    "export-param-map": ("write the distributed optimizer's param_map of every rank (MindSpeed-Core-MS JSON)",
                         add_export_arguments, run_export),
    "combine-dp-zero": ("merge MindSpeed-Core-MS distributed-optimizer buckets into per-parameter tensors",
                        add_combine_arguments, run_combine),
    "verify": ("certify that two checkpoints (Megatron, MindSpeed-Core-MS, MindSpore) hold the same model and "
               "optimizer state, bit for bit, "
               "at any layouts (exit 0) or say where they differ (exit 1)", add_verify_arguments, run_verify),
    **HF_COMMANDS,
    **MINDSPEED_COMMANDS,
    **MINDFORMERS_COMMANDS,
    **LORA_COMMANDS,
}


def return_freed_memory() -> None:
    """Serve tensors of 32 MiB and more from mmap, so that freeing them returns the memory.
    glibc's adaptive threshold would otherwise grow the heap towards the size of a whole file;
    smaller tensors stay on the heap, where the repeated layer shapes reuse it (measured in
    bench/: 4 MiB halves the speed, 128 MiB keeps more memory and is slower too)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: 32 MiB
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


EXAMPLES = {
    "convert": "ckpt-hooks convert --load-dir ckpt --save-dir ckpt_tp4 --target-tensor-parallel-size 4 "
               "--target-pipeline-parallel-size 1",
    "inspect": "ckpt-hooks inspect ckpt --tensors",
    "export-param-map": "ckpt-hooks export-param-map --load-dir ckpt --save-dir ckpt_param_maps",
    "verify": "ckpt-hooks verify ckpt ckpt_tp4",
    "combine-dp-zero": "ckpt-hooks combine-dp-zero --strategy-dir opt_shard_info --checkpoint-dir ckpt "
                       "--output-dir merged",
    "hf-to-megatron": "ckpt-hooks hf-to-megatron --load-dir Llama-3-8B --save-dir llama_tp2pp2 "
                      "--target-tensor-parallel-size 2 --target-pipeline-parallel-size 2",
    "megatron-to-hf": "ckpt-hooks megatron-to-hf --load-dir ckpt --save-dir ckpt_hf",
    "megatron-to-mindspore": "ckpt-hooks megatron-to-mindspore --megatron-path ckpt --ms-path ckpt_ms --tp-size 1",
    "mindspore-to-megatron": "ckpt-hooks mindspore-to-megatron --ms-path ckpt_ms --megatron-path ckpt_back --tp-size 2",
    "mindformers-to-megatron": "ckpt-hooks mindformers-to-megatron --load-dir mf --config config.json --save-dir ckpt "
                               "--target-tensor-parallel-size 2",
    "megatron-to-mindformers": "ckpt-hooks megatron-to-mindformers --load-dir ckpt --save-dir mf --qkv-concat",
    "hf-to-mindformers": "ckpt-hooks hf-to-mindformers --load-dir Qwen2-7B --save-dir mf",
    "mindformers-to-hf": "ckpt-hooks mindformers-to-hf --load-dir mf --config config.json --save-dir hf",
    "merge-lora": "ckpt-hooks merge-lora --load-dir base --lora-load lora --save-dir merged --save-format hf",
    "lora-to-peft": "ckpt-hooks lora-to-peft --lora-load lora --save-dir adapter",
    "merge-lora-mindspore": "ckpt-hooks merge-lora-mindspore --load-dir ms --save-dir merged --lora-alpha 16 "
                            "--lora-r 8",
}


class _HelpWithDefaults(argparse.HelpFormatter):
    """--help shows each flag's default, where it has one its help does not already state."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


class Interrupted(BaseException):
    """SIGTERM or SIGHUP (timeout, Slurm's scancel, a closed terminal): unwinds like Ctrl-C, so
    that staged output is removed."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame):
    raise Interrupted(signum)


def _error(message: str) -> None:
    """One error line in one write: torchrun's ranks share a stderr, and print's separate write of
    the newline let two ranks' lines run together."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def guarded(run, args) -> int:
    """Run a command; report a checkpoint problem as one line on stderr and a non-zero exit."""
    try:
        run(args)
    except CheckpointError as e:
        _error(str(e))
        return 2
    except OSError as e:  # the save directory's, mostly: not writable, no space left
        _error(f"{e.filename or '-'}: {e.strerror or e}")
        return 2
    except KeyboardInterrupt:
        _error("interrupted; nothing was written")
        return 130
    except Interrupted as e:
        _error(f"interrupted by {e}; nothing was written")
        return 128 + e.signum
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ckpt-hooks", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ckpt-hooks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        example = EXAMPLES.get(name)
        add_arguments(sub.add_parser(name, help=help_text, description=help_text,
                                     epilog=f"example: {example}" if example else None,
                                     formatter_class=_HelpWithDefaults))
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # `ckpt-hooks inspect ... | head` ends quietly
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun the ranks join now, so that they meet at exit (engine.ranks) and each
        # prints its line before torchrun stops the rest, whatever fails first (planning too).
        from ckpt_hooks.engine.ranks import Ranks
        Ranks.from_env()
    return_freed_memory()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    return guarded(COMMANDS[args.command][2], args)
