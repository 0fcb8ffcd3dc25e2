"""Planning at scale: a DeepSeek-V3-sized conversion (61 layers, 3 dense then 58 of 256 routed
experts + 1 shared, Multi-Latent Attention, vocabulary 129280; bf16, 1.3 TB of weights) planned
for one target rank, from a description of the source files (what each rank file holds: the
keys and shapes Megatron's legacy format gives that layout; no file is read). Each row: how long
one rank takes to describe the source, index it and plan its own file, its peak memory, and what
its plan reads, for a series of world sizes.

    python bench/bench_plan.py [--layers 61] [--rank 0]

The rows grow the source and target layouts together up to TP8·PP16·EP64 -> TP4·PP8·EP32.
A rank plans only its own file (``plan_files(ranks=)``); the index it plans from holds every
source file's tensors.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ckpt_hooks.algebra.spec import ModelSpec, ParallelConfig, round_up, uneven_layers  # noqa: E402
from ckpt_hooks.converters.hf import names as hf_names  # noqa: E402
from ckpt_hooks.engine.source import Tensor  # noqa: E402
from ckpt_hooks.megatron.checkpoint import place, plan_files, source_tensors  # noqa: E402
from ckpt_hooks.megatron.torch_dist import source_files  # noqa: E402

DENSE_LAYERS = 3
VOCAB = 129280


def deepseek_v3(layers: int) -> ModelSpec:
    return ModelSpec(num_layers=layers, hidden_size=7168, ffn_hidden_size=18432, num_attention_heads=128,
                     num_query_groups=128, kv_channels=128, padded_vocab_size=VOCAB, true_vocab_size=VOCAB,
                     swiglu=True, tied_embeddings=False, add_bias_linear=False, position_embedding_type="rope",
                     normalization="RMSNorm", num_experts=256, moe_ffn_hidden_size=2048,
                     shared_expert_ffn_hidden_size=2048, kv_lora_rank=512, q_lora_rank=1536, qk_head_dim=128,
                     qk_pos_emb_head_dim=64, v_head_dim=128, transformer_impl="transformer_engine")


def layout_of(tp: int, pp: int, ep: int, layers: int) -> ParallelConfig:
    """ETP1, the DP that EP needs; where the layers do not split evenly, the first and last stages
    share what the others' even share leaves (61 over 16: 2, 14 x 4, 3)."""
    stages = None
    if layers % pp:
        middle = round(layers / pp)
        first = (layers - (pp - 2) * middle) // 2
        stages = uneven_layers(layers, pp, first, layers - (pp - 2) * middle - first)
    return ParallelConfig(tp=tp, pp=pp, dp=max(1, ep // tp), ep=ep, etp=1, layers_per_stage=stages)


class Described:
    """A piece's handle: the source file rank holding its bytes (the plan reads no data)."""

    def __init__(self, rank):
        self.rank = rank


def logical_tensors(spec: ModelSpec) -> dict:
    """Every logical tensor of the model (a TP1·PP1 file's keys and shapes), in Megatron's order."""
    moe = set(range(DENSE_LAYERS, spec.num_layers))
    keys = [e.megatron for e in hf_names.entries("deepseek_v2", spec, "transformer_engine", moe)]
    tensors = {}
    for key in dict.fromkeys(keys):
        tensors[key] = Tensor(hf_names.tp1(key, spec).logical_shape, torch.bfloat16)
    for key in hf_names.extra_states(spec, "transformer_engine", moe):
        tensors.setdefault(key, Tensor((), None))
    return tensors


def plan_one(spec: ModelSpec, source: ParallelConfig, target: ParallelConfig, rank, logical: dict):
    """(seconds to describe, index, plan), the source files, the rank's planned file. The files
    are described as the torch_dist reader describes a layout's legacy view (``source_files``):
    what reading each rank file's pickle would tell."""
    started = time.perf_counter()
    files = source_files(logical, spec, source, "the description")
    described = time.perf_counter()
    tensors = source_tensors(files, place(spec, source, files), lambda f, chunk, key, where: Described(f.rank))
    indexed = time.perf_counter()
    (planned,) = plan_files(tensors, spec, target, ranks={rank})
    done = time.perf_counter()
    return (described - started, indexed - described, done - indexed), files, planned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=61)
    parser.add_argument("--rank", type=int, default=0, help="the target file rank planned (its index)")
    options = parser.parse_args()
    spec = deepseek_v3(options.layers)
    logical = logical_tensors(spec)
    total = sum(torch.Size(t.shape).numel() * 2 for t in logical.values() if t.dtype is not None)
    print(f"DeepSeek-V3-sized: {len(logical)} logical tensors, {total / 1e12:.2f} TB of bf16 weights; "
          f"planning target file rank #{options.rank}")
    rows = [((2, 4, 8), (1, 2, 4)), ((4, 8, 16), (2, 4, 8)), ((8, 8, 32), (4, 8, 16)), ((8, 16, 64), (4, 8, 32))]
    for (stp, spp, sep), (ttp, tpp, tep) in rows:
        source, target = layout_of(stp, spp, sep, spec.num_layers), layout_of(ttp, tpp, tep, spec.num_layers)
        spec = dataclasses.replace(spec, padded_vocab_size=round_up(VOCAB, 128 * stp))   # as Megatron pads it
        rank = target.file_ranks()[options.rank]
        timings = plan_one(spec, source, target, rank, logical)
        tracemalloc.start()   # again, for the memory (tracemalloc slows it)
        plan_one(spec, source, target, rank, logical)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        (described, indexed, planned_s), files, planned = timings
        read_from = {c.piece.handle.rank for t in planned.tensors for c in t.copies}
        print(f"TP{stp}·PP{spp}·EP{sep} ({len(files)} files) -> TP{ttp}·PP{tpp}·EP{tep} "
              f"({len(target.file_ranks())} files): describe {described:5.2f} s, index {indexed:5.2f} s, "
              f"plan one rank {planned_s:5.2f} s = {described + indexed + planned_s:5.2f} s; peak "
              f"{peak / 1e6:4.0f} MB of Python objects; the rank writes {planned.nbytes / 1e9:.1f} GB from "
              f"{len(read_from)} of the source files")


if __name__ == "__main__":
    main()
