"""``nn.MultiheadAttention`` seen as two layers the refits can solve: the packed in_proj and out_proj.

torch runs both projections inside ``F.multi_head_attention_forward`` from the module's parameters,
so no hook on ``out_proj`` ever fires and ``in_proj_weight`` belongs to no Linear: a refit that walks
Linear / Conv2d modules would silently keep attention's merged weights. Here both projections are
computed from the attention module's own input (self-attention: query = key = value), and the packed
in_proj gets a Linear view sharing its storage, so fitting or rescaling the view writes the
attention module's weights in place. Shared by the joint-input statistics (PLeaS' published refit),
the propagated least-squares refit and REPAIR (:mod:`lightning_merge.apply`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_merge.graph.spec import MergeGraph


def check_attention(mha: nn.MultiheadAttention, name: str) -> None:
    """Refuse the attention variants these refits do not model (naming the module)."""
    unsupported = {
        "separate q/k/v projection weights (kdim/vdim != embed_dim)": not mha._qkv_same_embed_dim,
        "bias_k/bias_v": mha.bias_k is not None,
        "add_zero_attn": mha.add_zero_attn,
    }
    bad = [what for what, present in unsupported.items() if present]
    if bad:
        raise ValueError(f"the refit of attention {name!r} does not support {', '.join(bad)}")


#: ``nn.MultiheadAttention.forward``'s positional parameters
_CALL = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights")


def check_self_attention_call(name: str, args: tuple, kwargs: dict) -> None:
    """Refuse a call that is not plain self-attention: the refits read q, k, v from one input."""
    bound = dict(zip(_CALL, args, strict=False)) | kwargs
    if not args or not (bound.get("key") is args[0] and bound.get("value") is args[0]):
        raise ValueError(
            f"the refit of attention {name!r} needs self-attention called as mha(x, x, x, ...) "
            "(query, key and value the same tensor, the query passed by position)"
        )
    masks = [k for k in ("key_padding_mask", "attn_mask") if bound.get(k) is not None]
    if masks or bound.get("is_causal"):
        raise ValueError(f"the refit of attention {name!r} does not support masks ({masks or ['is_causal']})")


def in_proj_view(mha: nn.MultiheadAttention) -> nn.Linear:
    """A Linear(E, 3E) whose weight and bias share storage with ``in_proj_weight`` / ``in_proj_bias``."""
    e = mha.embed_dim
    view = nn.Linear(e, 3 * e, bias=mha.in_proj_bias is not None, device="meta")
    view.weight = nn.Parameter(mha.in_proj_weight.detach(), requires_grad=False)
    if mha.in_proj_bias is not None:
        view.bias = nn.Parameter(mha.in_proj_bias.detach(), requires_grad=False)
    return view


def qkv(mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """The packed projections ``[q | k | v]`` of the tokens ``x`` (last axis 3E)."""
    return F.linear(x, mha.in_proj_weight, mha.in_proj_bias)


def context(mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """The heads' concatenated outputs, i.e. what ``out_proj`` is applied to (same layout as ``x``)."""
    tokens = x if mha.batch_first or x.dim() == 2 else x.transpose(0, 1)  # (batch, length, E)
    q, k, v = qkv(mha, tokens).chunk(3, dim=-1)
    heads, dim = mha.num_heads, mha.head_dim

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (heads, dim)).transpose(-3, -2)  # (..., heads, length, dim)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    out = out.transpose(-3, -2).flatten(-2)
    return out if mha.batch_first or x.dim() == 2 else out.transpose(0, 1)


def attention_output(mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """``out_proj`` applied to :func:`context`: the attention module's output for self-attention."""
    return mha.out_proj(context(mha, x))


def in_proj_space(graph: MergeGraph, name: str) -> str | None:
    """The merge point of ``name``'s q/k/v rows (all three stacked on one space), or None."""
    expects = f"the refit expects {name}.in_proj_weight axis 0 to be q, k, v of"
    return graph.whole_producer(f"{name}.in_proj_weight", 3, expects)


def stacked_block(block: torch.Tensor, channels: int) -> torch.Tensor:
    """A merge block over one of q, k, v repeated for all three (block-diagonal), when ``channels``
    is three times its width; else the block itself."""
    if channels == 3 * block.shape[1]:
        return torch.block_diag(block, block, block)
    return block
