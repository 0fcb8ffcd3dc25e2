"""What a conversion writes, as one value: the target's layout, vocabulary padding, dtype and layer spec.

    Target(tp, pp, vpp | layers_per_virtual_stage, dp, num_layer_list, ep, etp,  the layout; None: the source's
           make_vocab_size_divisible_by, padded_vocab_size, true_vocab_size,       vocabulary rows
           params_dtype, layer_spec, moe_grouped_gemm, noop_layers)                  what is written

Sizes left None keep the source's where they still apply (``layout``); every size is checked
against the model and against what Megatron-LM runs before anything is read, and a problem
names the flag that set it (``FLAGS``: the CLI's spellings, built by ``cli.target``). Pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ckpt_hooks.algebra import layout
from ckpt_hooks.algebra.spec import ModelSpec, ParallelConfig, even_or_none
from ckpt_hooks.errors import CheckpointError

FLAGS = {"tp": "--target-tensor-parallel-size", "pp": "--target-pipeline-parallel-size",
         "vpp": "--target-virtual-pipeline-parallel-size", "dp": "--target-data-parallel-size",
         "num_layer_list": "--num-layer-list", "ep": "--target-expert-model-parallel-size",
         "etp": "--target-expert-tensor-parallel-size", "make_vocab_size_divisible_by": "--make-vocab-size-divisible-by",
         "padded_vocab_size": "--padded-vocab-size", "true_vocab_size": "--true-vocab-size",
         "moe_grouped_gemm": "--moe-grouped-gemm", "noop_layers": "--noop-layers",
         "layers_per_virtual_stage": "--num-layers-per-virtual-pipeline-stage"}


def _fits_experts(spec: ModelSpec, config: ParallelConfig) -> bool:
    try:
        layout.check_experts(spec, config)
        return True
    except layout.LayoutError:
        return False


@dataclass(frozen=True)
class Target:
    tp: int | None = None
    pp: int | None = None
    vpp: int | None = None
    dp: int | None = None
    num_layer_list: tuple[int, ...] | None = None
    make_vocab_size_divisible_by: int | None = None
    padded_vocab_size: int | None = None
    true_vocab_size: int | None = None
    params_dtype: str | None = None    # "bf16", "fp16", "fp32"; None keeps the source's
    layer_spec: str | None = None      # "transformer_engine" or "local"; None: the converter's default
    ep: int | None = None              # expert parallel
    etp: int | None = None             # expert tensor parallel (None: the source's, or TP where that was TP)
    moe_grouped_gemm: bool | None = None   # experts as the legacy GroupedMLP or SequentialMLP; None: the source's
    noop_layers: tuple[int, ...] | None = None   # MindSpeed-LLM's noop layers an external model is padded with
    layers_per_virtual_stage: int | None = None  # Megatron-LM's way to give VPP: layers per virtual stage

    def __post_init__(self):
        for name in ("tp", "pp", "vpp", "dp", "ep", "etp", "make_vocab_size_divisible_by", "padded_vocab_size",
                     "true_vocab_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise self.error(name, "must be a positive number")
        if self.num_layer_list is not None and min(self.num_layer_list, default=0) < 1:
            raise self.error("num_layer_list", "every stage needs at least one layer")

    def error(self, name: str, message: str) -> CheckpointError:
        """A problem with the value of one field, named by its flag."""
        value = getattr(self, name)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        return CheckpointError(f"{FLAGS.get(name, name)} {shown}", message)

    def model(self, spec: ModelSpec) -> ModelSpec:
        """The source's model as the target stores it (its experts grouped or not)."""
        if self.moe_grouped_gemm is None or self.moe_grouped_gemm == spec.moe_grouped_gemm:
            return spec
        if not spec.num_experts:
            raise self.error("moe_grouped_gemm", "the model has no experts")
        return replace(spec, moe_grouped_gemm=self.moe_grouped_gemm)

    def padded(self, spec: ModelSpec) -> ModelSpec:
        """An external model (HF: no noop layers) padded with the noop layers asked for."""
        if not self.noop_layers:
            return spec
        try:
            return spec.with_noop_layers(self.noop_layers)
        except ValueError as e:
            raise self.error("noop_layers", str(e)) from None

    def _virtual_stages(self, spec: ModelSpec, pp: int) -> int | None:
        """VPP from --num-layers-per-virtual-pipeline-stage (MindSpeed-LLM's and Megatron-LM's spelling)."""
        per_stage = self.layers_per_virtual_stage
        if per_stage is None:
            return None
        if self.vpp is not None:
            raise self.error("layers_per_virtual_stage", f"and {FLAGS['vpp']} both give the virtual stages: pass one")
        if spec.num_layers % (pp * per_stage):
            raise self.error("layers_per_virtual_stage", f"does not split {spec.num_layers} layers over {pp} stages")
        return spec.num_layers // (pp * per_stage)

    def layout(self, source: ParallelConfig, spec: ModelSpec, notes: list | None = None) -> ParallelConfig:
        """The target layout: the sizes given, the rest kept from ``source`` where they still apply
        (VPP and uneven stages only with the same PP; context parallelism as the source's; DP by
        default fills the source's world, as ``notes`` says; an expert tensor parallel size equal
        to the source's TP follows the target's TP), checked against ``spec`` and Megatron-LM's
        own rules."""
        pp = self.pp or (len(self.num_layer_list) if self.num_layer_list else source.pp)
        vpp = self._virtual_stages(spec, pp) or self.vpp or (source.vpp if pp == source.pp else 1)
        tp = self.tp or source.tp
        stages = even_or_none(self.num_layer_list) if self.num_layer_list else \
            (source.layers_per_stage if pp == source.pp else None)
        dp = self.dp or max(source.world // (tp * pp * source.cp), 1)
        if self.dp is None and notes is not None and dp != source.dp:
            notes.append(f"data parallel size {dp} fills the source's {source.world} ranks "
                         f"(pass {FLAGS['dp']} to choose another)")
        etp = self.etp or source.etp
        target = ParallelConfig(tp=tp, pp=pp, vpp=vpp, dp=dp, layers_per_stage=stages, cp=source.cp,
                                ep=self.ep or source.ep, etp=None if etp == tp else etp)
        if target.etp and not self.etp and not _fits_experts(spec, target):   # Megatron-LM's default then
            target = replace(target, etp=None)
            if notes is not None:
                notes.append(f"expert tensor parallel size {tp} (TP): the source's {etp} does not fit "
                             f"{FLAGS['ep']} {target.ep} (pass {FLAGS['etp']} to choose another)")
        stage = tp * target.dp * target.cp   # the ranks of a stage must hold whole EP x ETP groups
        if self.dp is None and spec.num_experts and stage % (target.ep * target.size("etp")):
            target = replace(target, dp=math.lcm(stage, target.ep * target.size("etp")) // (tp * target.cp))
            if notes is not None:
                notes.append(f"data parallel size {target.dp}: each pipeline stage holds whole expert groups "
                             f"(pass {FLAGS['dp']} to choose another)")
        if vpp > 1 and pp == 1:
            raise self.error("vpp", "virtual pipeline stages need a pipeline parallel size above 1 "
                                    "(Megatron-LM refuses the layout)")
        if self.num_layer_list is not None and len(self.num_layer_list) != pp:
            raise self.error("num_layer_list", f"lists {len(self.num_layer_list)} stages, the pipeline has {pp}")
        try:
            layout.check_tensor_parallel(spec, tp)
        except layout.LayoutError as e:
            raise self.error("tp", str(e)) from None
        try:
            layout.check_layers(spec, target)
        except layout.LayoutError as e:
            raise self.error("num_layer_list" if self.num_layer_list else ("vpp" if self.vpp else "pp"),
                             str(e)) from None
        try:
            layout.check_experts(spec, target)
        except layout.LayoutError as e:
            raise self.error("etp" if self.etp else ("ep" if self.ep else "tp"), str(e)) from None
        return target
