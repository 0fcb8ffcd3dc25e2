"""The executor: a target tensor built from its copies, with bounded memory.

Each copy asks its piece's handle for exactly the elements it needs, written straight into
the copy's place in the output (``read_into``); a tensor that is one whole source piece is the
source's own view where the handle offers one (MindSpore's mmapped arrays). Peak memory is
about ``workers x largest target tensor``, whatever the size of the files. Works on torch and
NumPy outputs alike (the dtype says which); imports no torch itself.
"""

from __future__ import annotations

import numpy as np

from ckpt_hooks.engine.plan import TargetTensor


def _allocate(dtype, shape, zero: bool):
    if isinstance(dtype, np.dtype):
        return (np.zeros if zero else np.empty)(shape, dtype)
    import torch
    return (torch.zeros if zero else torch.empty)(shape, dtype=dtype)


def build_tensor(tensor: TargetTensor, exact: bool = False, out=None):
    """A target tensor (None for a non-tensor entry). ``exact``: read no byte it does not need
    (a rank reading its share); otherwise a handle may read a covering range in one go.
    ``out``: fill this tensor (of the target's dtype and size, contiguous) instead of a new one."""
    placement = tensor.placement
    if placement is None:
        return None
    if out is not None:
        if not tensor.complete:
            out[...] = 0
    elif len(tensor.copies) == 1 and tensor.complete and placement.stored_shape == placement.view_shape:
        copy = tensor.copies[0]
        view = getattr(copy.piece.handle, "view", None)
        if view is not None and (viewed := view(copy.source_slices)).dtype == tensor.dtype:
            return viewed
    if out is None:
        out = _allocate(tensor.dtype, placement.stored_shape, zero=not tensor.complete)
    target = out.reshape(placement.view_shape)
    for copy in tensor.copies:
        copy.piece.handle.read_into(copy.source_slices, target[tensor.target_slices(copy)], exact)
    return out
