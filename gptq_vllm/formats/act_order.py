"""Act-order (desc_act): what g_idx means and the permutation that makes it contiguous.

g_idx[k] is the group whose scale and zero dequantize input channel k.  A GPTQ checkpoint is valid when
every group has exactly G members (the last one fewer when G does not divide K): then sorting the rows
by g_idx yields the plain grouped layout arange(K)//G (formats.md §2.6, §3).
"""

from __future__ import annotations

import torch

from .errors import FormatError


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


def effective_group_size(in_features: int, group_size: int) -> int:
    return in_features if group_size == -1 else group_size


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """The g_idx of a checkpoint without act-order: arange(K) // G (all zeros for G = -1)."""
    g = effective_group_size(in_features, group_size)
    return (torch.arange(in_features, dtype=torch.int32, device=device) // g).to(torch.int32)


def is_trivial(g_idx: torch.Tensor, group_size: int) -> bool:
    """True when g_idx needs no permutation (non-act-order, static_groups, GAR, or G = -1)."""
    return bool(torch.equal(g_idx.to(torch.int32), default_g_idx(g_idx.numel(), group_size, g_idx.device)))


def check_g_idx(g_idx: torch.Tensor, in_features: int, group_size: int, name: str = "g_idx") -> None:
    """Raise FormatError unless g_idx is a GPTQ group assignment for K = in_features and this G."""
    if tuple(g_idx.shape) != (in_features,):
        raise FormatError(f"{name}: shape {tuple(g_idx.shape)}, expected ({in_features},)")
    if g_idx.dtype.is_floating_point or g_idx.dtype == torch.bool:
        raise FormatError(f"{name}: dtype {g_idx.dtype}, expected an integer type")
    ng = num_groups(in_features, group_size)
    g = effective_group_size(in_features, group_size)
    lo, hi = int(g_idx.min()), int(g_idx.max())
    if lo < 0 or hi >= ng:
        raise FormatError(f"{name}: group ids span [{lo}, {hi}], expected [0, {ng - 1}] (K={in_features}, G={group_size})")
    counts = torch.bincount(g_idx.to(torch.int64), minlength=ng)
    expected = torch.full((ng,), g, dtype=counts.dtype, device=counts.device)
    expected[-1] = in_features - g * (ng - 1)
    bad = (counts != expected).nonzero().flatten()
    if bad.numel():
        j = int(bad[0])
        raise FormatError(
            f"{name}: group {j} has {int(counts[j])} members, expected {int(expected[j])}; "
            f"not a GPTQ act-order assignment (every group must hold exactly G={g} channels)"
        )


def check_perm(perm: torch.Tensor, in_features: int, name: str = "perm") -> None:
    """Raise FormatError unless perm holds every input channel 0..K-1 exactly once (else the gather it
    drives would duplicate some channels and drop others, and its inverse would hide that)."""
    if tuple(perm.shape) != (in_features,):
        raise FormatError(f"{name}: shape {tuple(perm.shape)}, expected ({in_features},)")
    counts = torch.bincount(perm.to(torch.int64).clamp(-1, in_features) + 1, minlength=in_features + 2)
    bad = (counts[1:-1] != 1).nonzero().flatten()
    if int(counts[0]) or int(counts[-1]) or bad.numel():
        detail = (f"values outside [0, {in_features - 1}]" if int(counts[0]) or int(counts[-1])
                  else f"input channel {int(bad[0])} appears {int(counts[1 + int(bad[0])])} times")
        raise FormatError(f"{name}: not a permutation of range({in_features}) ({detail}); expected every input "
                          f"channel exactly once")


def act_order_perm(g_idx: torch.Tensor) -> torch.Tensor:
    """Row permutation p (int32 [K]) with g_idx[p] sorted; stable, so it is the identity for trivial g_idx.

    y = x @ W == x[:, p] @ W[p, :]: a kernel consumes rows W[p] and activations gathered by p.
    """
    return torch.argsort(g_idx.to(torch.int64), stable=True).to(torch.int32)


def inverse_perm(perm: torch.Tensor) -> torch.Tensor:
    return torch.argsort(perm.to(torch.int64)).to(torch.int32)
