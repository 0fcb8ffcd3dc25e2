"""ModelSpec (architecture facts needed to slice tensors) and ParallelConfig (how a run is split).

Pure: no I/O, no framework imports. Both can be read from a Megatron ``args`` Namespace.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class ModelSpec:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    padded_vocab_size: int          # rows of the embedding as saved (includes padding)
    true_vocab_size: int | None     # rows that are real tokens; None when unknown
    make_vocab_size_divisible_by: int = 128
    swiglu: bool = False
    tied_embeddings: bool = True
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    position_embedding_type: str = "learned_absolute"
    normalization: str = "LayerNorm"
    num_experts: int | None = None           # routed experts of each MoE layer; None: dense
    moe_ffn_hidden_size: int | None = None   # ffn rows of one expert
    shared_expert_ffn_hidden_size: int | None = None   # ffn rows of the shared experts (all of them)
    # The routed experts as megatron-core's legacy GroupedMLP (two tensors a layer) instead of
    # SequentialMLP (two per expert): the same numbers, stored transposed (megatron.grouped_experts).
    moe_grouped_gemm: bool = False
    # MindSpeed-LLM's noop layers (--noop-layers): global layers built as parameter-less pass-throughs,
    # which pad the layer count for the pipeline; an external model's (HF) layers are the others.
    noop_layers: tuple[int, ...] = ()
    # Multi-Latent Attention (DeepSeek-V2/V3): queries through a q_lora_rank latent (None: one
    # projection), keys and values from a kv_lora_rank latent plus one shared rotary key head.
    kv_lora_rank: int | None = None          # None: standard attention
    q_lora_rank: int | None = None
    qk_head_dim: int | None = None           # per head: the part of q and k without RoPE
    qk_pos_emb_head_dim: int | None = None   # ... with RoPE
    v_head_dim: int | None = None
    # The layer spec: the local one splits MLA's down projections over TP (column-parallel),
    # Transformer Engine's keeps them whole on every rank.
    transformer_impl: str = "transformer_engine"

    @property
    def real_layers(self) -> tuple[int, ...]:
        """The global layers that hold weights, in order: an external model's layer i is
        Megatron's layer ``real_layers[i]``."""
        return tuple(i for i in range(self.num_layers) if i not in self.noop_layers)

    def with_noop_layers(self, noop: tuple[int, ...]) -> "ModelSpec":
        """This model padded with noop layers at the global layers ``noop`` (of the padded count)."""
        total = self.num_layers + len(set(noop))
        if any(not 0 <= i < total for i in noop):
            raise ValueError(f"noop layers {','.join(map(str, noop))} must lie in the {total} layers "
                             f"({self.num_layers} and {len(set(noop))} noop)")
        return replace(self, num_layers=total, noop_layers=tuple(sorted(set(noop))))

    @property
    def latent_attention(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def rows_per_query_group(self) -> int:
        """Rows of linear_qkv per query group: its query heads, one key and one value head."""
        return (self.num_attention_heads // self.num_query_groups + 2) * self.kv_channels

    def padded_vocab_for(self, tp: int) -> int:
        """The embedding rows Megatron allocates at tensor-parallel size ``tp``."""
        if self.true_vocab_size is None:
            return self.padded_vocab_size
        return round_up(self.true_vocab_size, self.make_vocab_size_divisible_by * tp)

    def describe(self) -> str:
        gqa = f" (GQA, {self.num_query_groups} groups)" if self.num_query_groups != self.num_attention_heads and \
            not self.latent_attention else ""
        vocab = f"vocab {self.true_vocab_size} padded to {self.padded_vocab_size}" if self.true_vocab_size \
            else f"vocab {self.padded_vocab_size} (padded)"
        return (f"{self.num_layers} layers, hidden {self.hidden_size}, ffn {self.ffn_hidden_size}"
                f"{' SwiGLU' if self.swiglu else ''}, {self.num_attention_heads} heads{gqa}, "
                + ("" if self.latent_attention else f"kv_channels {self.kv_channels}, ") + f"{vocab}, "
                f"{'tied' if self.tied_embeddings else 'untied'} embeddings, {self.normalization}, "
                f"{self.position_embedding_type}, {'with' if self.add_bias_linear else 'no'} linear bias"
                + (f", {self.num_experts} experts of ffn {self.moe_ffn_hidden_size}" if self.num_experts else "")
                + (f", shared experts of ffn {self.shared_expert_ffn_hidden_size}"
                   if self.shared_expert_ffn_hidden_size else "")
                + (f", latent attention (q rank {self.q_lora_rank}, kv rank {self.kv_lora_rank})"
                   if self.latent_attention else "")
                + (f", noop layers {','.join(map(str, self.noop_layers))}" if self.noop_layers else ""))


@dataclass(frozen=True)
class ParallelConfig:
    """Sizes of the named parallel dimensions, as megatron-core derives its groups from them:
    ``tp`` tensor, ``pp`` pipeline, ``vpp`` model chunks per stage, ``dp`` data, ``cp`` context,
    ``ep`` expert, ``etp`` expert tensor (None: the same as ``tp``). The dense distributed
    optimizer shards over DP x CP; the expert one over the expert-data-parallel group."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    dp: int = 1
    layers_per_stage: tuple[int, ...] | None = field(default=None)  # uneven PP; None = even split
    cp: int = 1
    ep: int = 1
    etp: int | None = None

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def dense_dp(self) -> int:
        """Ranks the dense distributed optimizer shards over."""
        return self.dp * self.cp

    @property
    def expert_dp(self) -> int:
        """Ranks the expert distributed optimizer shards over."""
        return self.world // (self.pp * self.ep * (self.etp or self.tp))

    def file_ranks(self) -> list["Rank"]:
        """The ranks that write a legacy model file, pipeline-major as Megatron lists them: in
        each stage the first expert-data-parallel replica, whose processes are numbered expert
        tensor rank fastest, then expert rank (megatron-core's order); each one's tensor rank
        is its position modulo TP. Without experts: the tensor ranks."""
        etp = self.size("etp")
        return [Rank(position % self.tp, pp, position // etp)
                for pp in range(self.pp) for position in range(etp * self.ep)]

    def size(self, dim: str) -> int:
        """The size of a named dimension ("tp", "pp", "ep", "etp", ...)."""
        return (self.etp or self.tp) if dim == "etp" else getattr(self, dim)

    def coordinate(self, rank: "Rank", dim: str) -> int:
        """A file rank's index along a named dimension; its expert tensor rank follows from its
        tensor and expert ranks (``file_ranks``)."""
        if dim != "etp":
            return getattr(rank, dim)
        return (rank.tp - self.size("etp") * rank.ep) % self.tp

    def holds_dense_optimizer(self, rank: "Rank") -> bool:
        """Whether a file rank is a dense data-parallel rank 0: with EP > 1 only those files'
        distrib_optim.pt hold the dense optimizer's state (others None)."""
        return self.coordinate(rank, "etp") + self.size("etp") * rank.ep < self.tp

    @property
    def model_parallel(self) -> tuple:
        """What tells a layout's model shards apart (DP and CP only replicate or shard the optimizer):
        two layouts with the same hold the same tensors in the same files."""
        return self.tp, self.pp, self.vpp, self.layers_per_stage, self.ep, self.size("etp")

    def describe(self) -> str:
        text = f"TP{self.tp}·PP{self.pp}" + (f"·VPP{self.vpp}" if self.vpp > 1 else "") + f"·DP{self.dp}"
        text += (f"·CP{self.cp}" if self.cp > 1 else "") + (f"·EP{self.ep}" if self.ep > 1 else "")
        text += f"·ETP{self.etp}" if self.etp not in (None, self.tp) and self.ep > 1 else ""
        if self.layers_per_stage:
            text += f" layers per stage {list(self.layers_per_stage)}"
        return text


@dataclass(frozen=True, order=True)
class Rank:
    """A point of a layout: one coordinate per dimension that tells files apart (tensor,
    pipeline, expert); the data-parallel dimensions hold replicas or optimizer shards."""

    tp: int = 0
    pp: int = 0
    ep: int = 0


def _true_vocab_size(args) -> int | None:
    vocab = getattr(args, "vocab_size", None)
    if vocab is None:
        return None
    # NullTokenizer appends one end-of-document token to --vocab-size.
    return vocab + 1 if getattr(args, "tokenizer_type", None) == "NullTokenizer" else vocab


def model_spec_from_args(args) -> ModelSpec:
    heads = args.num_attention_heads
    groups = args.num_query_groups if getattr(args, "group_query_attention", False) and args.num_query_groups else heads
    kv_channels = getattr(args, "kv_channels", None) or args.hidden_size // heads
    return ModelSpec(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=kv_channels,
        padded_vocab_size=args.padded_vocab_size,
        true_vocab_size=_true_vocab_size(args),
        make_vocab_size_divisible_by=getattr(args, "make_vocab_size_divisible_by", None) or 128,
        swiglu=bool(getattr(args, "swiglu", False)),
        tied_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False),
        add_bias_linear=bool(getattr(args, "add_bias_linear", True)),
        add_qkv_bias=bool(getattr(args, "add_qkv_bias", False)),
        position_embedding_type=getattr(args, "position_embedding_type", "learned_absolute"),
        normalization=getattr(args, "normalization", "LayerNorm"),
        num_experts=getattr(args, "num_experts", None) or None,
        moe_ffn_hidden_size=(getattr(args, "moe_ffn_hidden_size", None) or args.ffn_hidden_size)
        if getattr(args, "num_experts", None) else None,
        shared_expert_ffn_hidden_size=getattr(args, "moe_shared_expert_intermediate_size", None) or None,
        moe_grouped_gemm=bool(getattr(args, "num_experts", None) and getattr(args, "moe_grouped_gemm", False)),
        noop_layers=noop_layers_of(args),
        **(dict(kv_lora_rank=args.kv_lora_rank, q_lora_rank=getattr(args, "q_lora_rank", None),
                qk_head_dim=args.qk_head_dim, qk_pos_emb_head_dim=args.qk_pos_emb_head_dim, v_head_dim=args.v_head_dim)
           if getattr(args, "multi_latent_attention", False) else {}),
        transformer_impl=getattr(args, "transformer_impl", None) or "transformer_engine",
    )


def noop_layers_of(args) -> tuple[int, ...]:
    """MindSpeed-LLM's ``noop_layers``: a set of global layers once parsed, ``"1,2"`` as given."""
    noop = getattr(args, "noop_layers", None) or ()
    return tuple(sorted({int(i) for i in (noop.split(",") if isinstance(noop, str) else noop)}))


def vocab_divisor(true_vocab: int, padded: int, tp: int) -> int | None:
    """A ``make_vocab_size_divisible_by`` under which Megatron pads ``true_vocab`` rows to
    ``padded`` at TP ``tp``: its default 128 where that fits, else the nearest power of two
    that does (larger ones first); None when none does."""
    candidates = [128] + [1 << k for k in range(8, padded.bit_length())] + [64, 32, 16, 8, 4, 2, 1]
    return next((d for d in candidates if round_up(true_vocab, d * tp) == padded), None)


def uneven_layers(num_layers: int, pp: int, first: int | None, last: int | None) -> tuple[int, ...] | None:
    """Megatron's first/last-stage layer counts as a per-stage list (None when even)."""
    if not first and not last:
        return None
    middle_stages = pp - (1 if first else 0) - (1 if last else 0)
    middle_layers = num_layers - (first or 0) - (last or 0)
    per_middle = middle_layers // middle_stages if middle_stages else 0
    stages = [per_middle] * pp
    if first:
        stages[0] = first
    if last:
        stages[-1] = last
    return tuple(stages)


def first_last_layers(stages: tuple[int, ...]) -> tuple[int, int] | None:
    """Express a per-stage list as Megatron's (first, last) counts; None if it cannot be
    (Megatron spreads the other layers evenly over the middle stages)."""
    if len(stages) > 1 and uneven_layers(sum(stages), len(stages), stages[0], stages[-1]) == stages:
        return stages[0], stages[-1]
    return None


def even_or_none(stages) -> tuple[int, ...] | None:
    """A per-stage layer list, or None when it is an even split (Megatron's default)."""
    stages = tuple(stages) if stages else None
    return None if not stages or len(set(stages)) == 1 else stages


def parse_layer_list(text: str | None) -> tuple[int, ...] | None:
    return tuple(int(x) for x in str(text).split(",")) if text else None


def parallel_config_from_args(args) -> ParallelConfig:
    pp = getattr(args, "pipeline_model_parallel_size", 1) or 1
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None) or 1
    stages = even_or_none(parse_layer_list(getattr(args, "num_layer_list", None))) or uneven_layers(
        args.num_layers, pp, getattr(args, "decoder_first_pipeline_num_layers", None),
        getattr(args, "decoder_last_pipeline_num_layers", None))
    tp = getattr(args, "tensor_model_parallel_size", 1) or 1
    experts = bool(getattr(args, "num_experts", None))   # a dense model's expert sizes mean nothing
    etp = getattr(args, "expert_tensor_parallel_size", None) if experts else None
    return ParallelConfig(tp=tp, pp=pp, vpp=vpp, dp=getattr(args, "data_parallel_size", 1) or 1,
                          layers_per_stage=stages, cp=getattr(args, "context_parallel_size", 1) or 1,
                          ep=(getattr(args, "expert_model_parallel_size", 1) or 1) if experts else 1,
                          etp=None if etp in (None, tp) else etp)


def updated_args(args, spec: ModelSpec, config: ParallelConfig):
    """A copy of Megatron ``args`` describing the same model at another layout."""
    new = type(args)(**vars(args))
    new.tensor_model_parallel_size = config.tp
    new.pipeline_model_parallel_size = config.pp
    new.virtual_pipeline_model_parallel_size = config.vpp if config.vpp > 1 else None
    new.num_layers_per_virtual_pipeline_stage = (spec.num_layers // (config.pp * config.vpp)
                                                 if config.vpp > 1 else None)
    stages = config.layers_per_stage
    first, last = (first_last_layers(stages) or (None, None)) if stages else (None, None)
    new.decoder_first_pipeline_num_layers, new.decoder_last_pipeline_num_layers = first, last
    new.num_layer_list = ",".join(map(str, stages)) if stages else None  # MindSpeed's spelling
    new.padded_vocab_size = spec.padded_vocab_for(config.tp)
    new.make_vocab_size_divisible_by = spec.make_vocab_size_divisible_by   # as assumed, where the args lacked it
    new.data_parallel_size = config.dp
    new.expert_model_parallel_size = config.ep
    new.expert_tensor_parallel_size = config.size("etp")
    if spec.num_experts:
        new.moe_grouped_gemm = spec.moe_grouped_gemm
    return new
