"""The pure layout algebra, checked against megatron-core's own rules where it has them."""

import dataclasses
import itertools
import math
import random
import re

import pytest
import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from ckpt_hooks.algebra.layout import (Box, LayoutError, Rule, SPLIT, VOCAB, check_divisible, chunk_layers,
                                       element_range_boxes, placement)
from ckpt_hooks.algebra.spec import ModelSpec, ParallelConfig, Rank, first_last_layers, uneven_layers

SPEC = ModelSpec(num_layers=8, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8, num_query_groups=4,
                 kv_channels=8, padded_vocab_size=128, true_vocab_size=100, make_vocab_size_divisible_by=16,
                 swiglu=True)


def layouts():
    for pp, vpp in [(1, 1), (2, 1), (4, 1), (2, 2), (2, 4), (4, 2), (8, 1)]:
        yield ParallelConfig(pp=pp, vpp=vpp)
    for first, last in [(1, None), (None, 1), (3, 1), (2, 2), (1, 5)]:
        for pp in (2, 3, 4):
            stages = uneven_layers(8, pp, first, last)
            if sum(stages) == 8 and min(stages) > 0:
                yield ParallelConfig(pp=pp, layers_per_stage=stages)


@pytest.mark.parametrize("config", list(layouts()), ids=lambda c: c.describe())
def test_layer_offsets_match_megatron(config):
    first_last = first_last_layers(config.layers_per_stage) if config.layers_per_stage else (None, None)
    megatron = TransformerConfig(num_layers=8, hidden_size=64, num_attention_heads=8, use_cpu_initialization=True,
                                 pipeline_model_parallel_size=config.pp,
                                 virtual_pipeline_model_parallel_size=config.vpp if config.vpp > 1 else None,
                                 num_layers_in_first_pipeline_stage=first_last[0],
                                 num_layers_in_last_pipeline_stage=first_last[1],
                                 pipeline_dtype=None if config.pp == 1 else torch.float32)
    seen = []
    for pp_rank, vp in itertools.product(range(config.pp), range(config.vpp)):
        layers = chunk_layers(SPEC, config, pp_rank, vp)
        expected = get_transformer_layer_offset(megatron, vp_stage=vp if config.vpp > 1 else None, pp_rank=pp_rank)
        assert layers.start == expected
        seen += list(layers)
    assert sorted(seen) == list(range(8))


@pytest.mark.parametrize("tp, rank, rows", [(2, 1, (64, 64)), (8, 5, (80, 16))])
def test_gqa_qkv_rows_split_evenly_even_beyond_the_groups(tp, rank, rows):
    """4 groups of (2 query + key + value heads) x 8 channels = 128 rows, split evenly over TP:
    at TP 8 each rank holds half a group, as megatron-core does when TP exceeds the groups."""
    where = placement(Rule(SPLIT, ("Q", "H"), axis=0), SPEC, ParallelConfig(tp=tp), Rank(tp=rank), vocab_rows=128)
    assert where.logical_shape == (128, 64)
    assert where.box == Box((rows[0], 0), (rows[1], 64))
    assert where.stored_shape == (rows[1], 64)


def test_swiglu_fc1_box_takes_gate_and_up_rows_of_the_rank():
    where = placement(Rule(SPLIT, ("S", "F", "H"), axis=1, fused=True), SPEC, ParallelConfig(tp=4), Rank(tp=3),
                      vocab_rows=128)
    assert where.logical_shape == (2, 128, 64)
    assert where.box == Box((0, 96, 0), (2, 32, 64))
    assert where.stored_shape == (64, 64)


def test_vocab_padding_follows_tp():
    assert [SPEC.padded_vocab_for(tp) for tp in (1, 2, 4, 8)] == [112, 128, 128, 128]
    where = placement(Rule(VOCAB, ("V", "H")), SPEC, ParallelConfig(tp=4), Rank(tp=2),
                      vocab_rows=SPEC.padded_vocab_for(4))
    assert where.box == Box((64, 0), (32, 64))


@pytest.mark.parametrize("heads, groups, ffn, tp, message", [
    (8, 4, 128, 3, "does not divide attention heads (8)"),
    (12, 6, 96, 4, "neither divides nor is a multiple of query groups (6)"),
    (8, 8, 100, 8, "does not divide ffn hidden size (100)"),
])
def test_layouts_that_cannot_hold_the_model_are_refused(heads, groups, ffn, tp, message):
    spec = dataclasses.replace(SPEC, num_attention_heads=heads, num_query_groups=groups, ffn_hidden_size=ffn)
    with pytest.raises(LayoutError, match=re.escape(message)):
        check_divisible(spec, ParallelConfig(tp=tp))


def test_box_intersection():
    a, b = Box((0, 4), (4, 4)), Box((2, 0), (4, 6))
    assert a.intersect(b) == Box((2, 4), (2, 2))
    assert a.intersect(Box((4, 0), (1, 8))) is None
    assert Box((2, 4), (2, 2)).slices_within(a) == (slice(2, 4), slice(0, 2))


def test_element_range_boxes_hold_exactly_the_range():
    """A DP shard of a flattened tensor, as boxes: every element once, in order (what lets a
    rank read only its shard of the optimizer state)."""
    rng = random.Random(0)
    for _ in range(2000):
        shape = tuple(rng.randint(1, 5) for _ in range(rng.randint(1, 4)))
        total = math.prod(shape)
        start = rng.randint(0, total)
        stop = rng.randint(start, total)
        flat = []
        for offsets, lengths in element_range_boxes(shape, start, stop):
            for index in itertools.product(*(range(o, o + n) for o, n in zip(offsets, lengths))):
                flat.append(sum(i * math.prod(shape[axis + 1:]) for axis, i in enumerate(index)))
        assert flat == list(range(start, stop)), (shape, start, stop)


def test_a_rule_over_two_dimensions_places_experts():
    """Experts are data: whole experts over EP, then ETP inside each expert's rows."""
    from ckpt_hooks.algebra.layout import expert_range

    rule = Rule(SPLIT, None, axis=0, dim="ep", also=((1, "etp"),))
    config = ParallelConfig(tp=2, ep=2, etp=2)
    boxes = {(ep, tp): placement(rule, SPEC, config, Rank(tp=tp, ep=ep), vocab_rows=128, file_shape=(4, 8, 6)).box
             for ep in range(2) for tp in range(2)}
    assert boxes[(1, 0)].offsets == (2, 0, 0) and boxes[(1, 1)].offsets == (2, 4, 0)
    assert all(box.lengths == (2, 4, 6) for box in boxes.values())
    assert sum(box.numel for box in boxes.values()) == 4 * 8 * 6
    assert list(expert_range(8, ParallelConfig(ep=4), 3)) == [6, 7]
    with pytest.raises(LayoutError):
        placement(rule, SPEC, ParallelConfig(tp=3, ep=2, etp=3), Rank(), vocab_rows=128, file_shape=(4, 8, 6))


@pytest.mark.parametrize("saved, want", [("3,1", (1, 3)), ({2}, (2,)), (None, ())])
def test_noop_layers_as_mindspeed_llm_saves_them(saved, want):
    """MindSpeed-LLM's args hold noop_layers as given ("3,1") or parsed (a set): the same layers."""
    import argparse

    from ckpt_hooks.algebra.spec import noop_layers_of

    assert noop_layers_of(argparse.Namespace(noop_layers=saved)) == want


def test_an_external_model_padded_with_noop_layers():
    """7 HF layers padded with noop layer 3 are Megatron's 8; HF layer i is Megatron's real_layers[i]."""
    seven = dataclasses.replace(SPEC, num_layers=7)
    padded = seven.with_noop_layers((3,))
    assert padded.num_layers == 8 and padded.real_layers == (0, 1, 2, 4, 5, 6, 7)
    with pytest.raises(ValueError, match="must lie in the 8 layers"):
        seven.with_noop_layers((8,))
