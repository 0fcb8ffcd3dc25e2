"""``ckpt-hooks megatron-to-mindspore`` / ``mindspore-to-megatron``: MindSpeed-Core-MS's
convert_pt2ckpt.py / convert_ckpt2pt.py, with their flag names. The layout flags give the
layout to write (default: the source's), so one pass can also change TP / PP / VPP."""

from __future__ import annotations

import argparse
import os

from ckpt_hooks.cli.target import add_layout_arguments, positive, reports, target_from


def _common(parser: argparse.ArgumentParser) -> None:
    add_layout_arguments(parser)
    parser.add_argument("--cp-size", type=positive, default=1,
                        help="context parallel size: counts the DP x CP copies and param_map files (Megatron's files "
                             "do not depend on it)")
    parser.add_argument("--stage-list", type=positive, nargs="+",
                        help="layers per pipeline stage, for uneven splits (MindSpeed's spelling of --num-layer-list)")
    parser.add_argument("--num-layers", type=int, help="checked against the model's (no-op layers included)")
    parser.add_argument("--convert-param-only", action="store_true",
                        help="the weights only, not the distributed optimizer's fp32 params and Adam moments")
    parser.add_argument("--process-limit", type=int, default=min(4, os.cpu_count() or 1),
                        help="rank files converted in parallel")
    parser.add_argument("--multiprocess-off", action="store_true", help="one rank file at a time")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no md5 list")


def add_to_mindspore_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--megatron-path", required=True, help="Megatron checkpoint: its root or an iter_* directory")
    parser.add_argument("--ms-path", required=True, help="where to write (must not exist or be empty)")
    parser.add_argument("--param-map-path",
                        help="MindSpeed-Core-MS param_map files of the source, checked against the param_map used "
                             "(recorded beside distrib_optim.pt, or rebuilt and checked against it)")
    _common(parser)
    parser.add_argument("--generate-all-dp-cp", action="store_true",
                        help="also write a copy per DP x CP rank ({prefix}_{rank:03d})")
    parser.add_argument("--file-prefix", default="model_optim_rng", help="MindSpore file name")
    parser.add_argument("--format", choices=("ckpt", "safetensors"), default="ckpt")


def add_to_megatron_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ms-path", required=True, help="MindSpore checkpoint: its root or an iter_* directory")
    parser.add_argument("--megatron-path", required=True, help="where to write (must not exist or be empty)")
    parser.add_argument("--param-map-path", help="the pt_meta directory (default: <ms-path root>/pt_meta)")
    _common(parser)
    parser.add_argument("--noop", type=int, nargs="+", default=(),
                        help="MindSpore layer ids that are no-op layers, not in the Megatron model")
    parser.add_argument("--src-model-format", choices=("ckpt", "safetensors"),
                        help="read only these files (default: whichever a rank directory holds)")


def _layout(args) -> dict:
    if args.stage_list:
        args.num_layer_list = tuple(args.stage_list)
    return {"target": target_from(args), "num_layers": args.num_layers, "convert_param_only": args.convert_param_only,
            "workers": 1 if args.multiprocess_off else args.process_limit, "quiet": args.quiet}


def _print(report, save_dir, quiet: bool) -> None:
    if reports(quiet):
        print(f"wrote {save_dir}: {report}")
        for path, md5 in report.md5.items():  # md5 of each file's tensors (see files.tensor_md5)
            print(f"{md5}  {path}")


def run_to_mindspore(args) -> None:
    from ckpt_hooks.converters.mindspeed.to_mindspore import megatron_to_mindspore

    report = megatron_to_mindspore(args.megatron_path, args.ms_path, cp=args.cp_size, file_format=args.format,
                                   file_prefix=args.file_prefix, generate_all_dp_cp=args.generate_all_dp_cp,
                                   param_map_path=args.param_map_path, **_layout(args))
    _print(report, args.ms_path, args.quiet)


def run_to_megatron(args) -> None:
    from ckpt_hooks.converters.mindspeed.to_megatron import mindspore_to_megatron

    # --cp-size is accepted for MindSpeed-Core-MS command lines: Megatron's files do not depend on it.
    report = mindspore_to_megatron(args.ms_path, args.megatron_path, param_map_path=args.param_map_path,
                                   noop=args.noop, src_format=args.src_model_format, **_layout(args))
    _print(report, args.megatron_path, args.quiet)


COMMANDS = {
    "megatron-to-mindspore": ("convert a Megatron checkpoint (weights, optimizer state) to MindSpeed-Core-MS "
                              "MindSpore files, at any layout", add_to_mindspore_arguments, run_to_mindspore),
    "mindspore-to-megatron": ("convert a MindSpeed-Core-MS MindSpore checkpoint back to Megatron, at any layout",
                              add_to_megatron_arguments, run_to_megatron),
}
