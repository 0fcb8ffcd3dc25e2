"""Route megatron-core 0.16.1's CUDA calls to the CPU (test-only code).

megatron-core assumes a GPU in a handful of places (current device, streams, the RNG
tracker, ``device='cuda'`` factory calls, the DistributedOptimizer's ``Tensor.type()``
checks).  The patches below are the minimum that lets GPTModel + DDP + the distributed
optimizer train under torchrun with the gloo backend on a CPU-only torch build.
Never import this from library code.
"""

import contextlib
import types

import torch
from torch.overrides import TorchFunctionMode

_installed = False


def _is_cuda(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return isinstance(dev, str) and dev.startswith("cuda")


class _CudaToCpu(TorchFunctionMode):
    """Rewrites every CUDA device argument (positional or ``device=``) to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


_orig_tensor_type = torch.Tensor.type


def _tensor_type(self, dtype=None, non_blocking=False, **kwargs):
    # The DistributedOptimizer accepts only 'torch.cuda.*Tensor' names for its params.
    if dtype is None and not kwargs:
        name = _orig_tensor_type(self)
        return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
    return _orig_tensor_type(self, dtype, non_blocking, **kwargs)


class _NoStream:
    """Stands in for torch.cuda.Stream: every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _get_rng_state(*args, **kwargs):
    # megatron's tracker clones/restores states; on the CPU the state is the CPU generator's.
    return torch.get_rng_state()


def _set_rng_state(new_state, *args, **kwargs):
    torch.set_rng_state(new_state)


def _in_any_dtype(forward):
    def run(self, *args, **kwargs):
        if self.config.bf16:
            return forward(self, *args, **kwargs)
        self.config.bf16 = True   # read by the forward's assertion alone
        try:
            return forward(self, *args, **kwargs)
        finally:
            self.config.bf16 = False
    return run


def _grouped_matmul(a, b, batch_sizes, trans_b=False):
    """grouped_gemm.ops.gmm: the rows of ``a`` in groups of ``batch_sizes``, group i times b[i]."""
    groups = torch.split(a, batch_sizes.tolist())
    return torch.cat([x @ (w.t() if trans_b else w) for x, w in zip(groups, b)])


def install() -> None:
    """Idempotently apply all patches to this process."""
    global _installed
    if _installed:
        return
    _installed = True

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.Stream = _NoStream
    torch.cuda.current_stream = lambda *a, **k: _NoStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_device_capability = lambda *a, **k: (8, 0)   # Megatron-LM's --moe-grouped-gemm check
    # model_parallel_cuda_manual_seed and the RNG tracker call these directly.
    torch.cuda.manual_seed = torch.manual_seed
    torch.cuda.get_rng_state = _get_rng_state
    torch.cuda.set_rng_state = _set_rng_state
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.type = _tensor_type

    # The mode must stay active for the whole process (optimizer state, p2p buffers...).
    _CudaToCpu().__enter__()

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _get_rng_state  # returns a fresh copy already
    mcore_random._set_cuda_rng_state = _set_rng_state

    # Without Transformer Engine moe_utils never binds te_general_gemm (NameError in the router).
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # The legacy GroupedMLP calls the grouped_gemm package's CUDA kernels: a plain-torch stand-in.
    from megatron.core.transformer.moe import grouped_gemm_util

    if grouped_gemm_util.grouped_gemm is None:
        grouped_gemm_util.grouped_gemm = grouped_gemm_util.ops = types.SimpleNamespace(gmm=_grouped_matmul)
    # GroupedMLP asserts bf16, which those kernels need; the stand-in computes in any dtype, so the
    # tests may run it in fp32 (bf16 matmuls are ~8x slower on these CPUs).
    from megatron.core.transformer.moe.experts import GroupedMLP

    GroupedMLP.forward = _in_any_dtype(GroupedMLP.forward)

    # MoE with TP > 1 needs sequence parallelism, which the local spec's torch norms refuse: build
    # them without it and mark their params sequence-parallel (their grads are then all-reduced
    # over TP, as Transformer Engine's norms' are).
    from megatron.core.transformer import torch_norm

    build_norm = torch_norm.WrappedTorchNorm.__new__

    def norm_with_sequence_parallel(cls, config, *args, **kwargs):
        if not config.sequence_parallel:
            return build_norm(cls, config, *args, **kwargs)
        config.sequence_parallel = False
        try:
            norm = build_norm(cls, config, *args, **kwargs)
        finally:
            config.sequence_parallel = True
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = norm_with_sequence_parallel
    _latent_attention_on_cpu()


class CpuAttention(torch.nn.Module):
    """Causal softmax attention whose keys and values may have different head sizes, as
    Multi-Latent Attention needs: on a GPU Transformer Engine's DotProductAttention does this;
    megatron-core 0.16.1's local one takes a single head size. No parameters of its own."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, softmax_scale=None, k_channels=None,
                 v_channels=None, cp_comm_type=None, pg_collection=None):
        super().__init__()
        self.softmax_scale = softmax_scale or (k_channels or config.kv_channels) ** -0.5

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        seq, batch, heads, _ = query.shape   # [s, b, n, d] each
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.softmax_scale
        scores = scores.masked_fill(torch.ones(seq, k.shape[2], dtype=torch.bool).triu(1), float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return torch.matmul(probs, v).permute(2, 0, 1, 3).reshape(seq, batch, heads * v.shape[-1])


def _latent_attention_on_cpu() -> None:
    """Multi-Latent Attention runnable here: CpuAttention as its core attention, whatever spec
    built it (ours or Megatron-LM's), and megatron-core told that Transformer Engine is absent
    (its stand-in classes are mocks, which isinstance() refuses)."""
    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.HAVE_TE = False
    build = multi_latent_attention.MLASelfAttention.__init__

    def init(self, config, submodules, *args, **kwargs):
        submodules.core_attention = CpuAttention
        build(self, config, submodules, *args, **kwargs)

    multi_latent_attention.MLASelfAttention.__init__ = init
