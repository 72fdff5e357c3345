"""Top-k sparse attention and the adaptive sparse-attention mixture of experts built on it.

``TopKSparseAttention`` is multi-head attention in which each query attends only to its ``topk``
highest-scoring keys (``fastvision.ops.topk_attention``). ``AdaptiveSparseAttentionMoE`` runs
several of them with different ``topk`` budgets as experts and lets a small router decide, per
token, how much of each it uses: a cheap expert for easy tokens, a wide one for hard tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastvision.nn import _checks
from fastvision.ops.block_topk_attention import BLOCK_SIZES, block_topk_attention
from fastvision.ops.topk_attention import SUPPORTED_HEAD_DIMS, topk_attention
from fastvision.profiling.ranges import nvtx_range

ROUTINGS = ("soft", "top1")
MODES = ("token", "block")


def _check_mode(mode: str, block_size: int) -> None:
    _checks.choice("mode", mode, MODES)
    _checks.int_choice("block_size", block_size, BLOCK_SIZES)


class TopKSparseAttention(nn.Module):
    """Multi-head attention where each query attends to its ``topk`` best keys only.

    ``mode="token"`` (default): each query selects its ``topk`` keys of highest score
    (``fastvision.ops.topk_attention``). ``mode="block"``: queries and keys are cut into blocks of
    ``block_size`` tokens and each query block attends to all keys of its ``topk`` key blocks of
    highest mean-query . mean-key score (``fastvision.ops.block_topk_attention``); ``topk`` then
    counts key blocks. ``causal=True`` (block mode only): query ``i`` sees keys ``j <= i``, aligned as
    SDPA's ``is_causal`` (upper left), each query block selecting among the key blocks at or before it.

    ``forward(x, context=None)``: queries come from ``x`` ``[B, Nq, dim]``, keys and values from
    ``context`` ``[B, Nk, dim]`` (``None``: self-attention over ``x``). ``topk >= Nk`` is plain
    dense attention. One ``qkv`` linear layer holds the query, key and value projections
    (``[3 * dim, dim]``, same layout as ``fastvision.nn.attention.MultiHeadAttention``): self-attention
    projects in one matmul, cross-attention slices it. ``dropout`` applies to the output
    projection (the op has no attention-probability dropout).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        topk: int,
        dropout: float = 0.0,
        bias: bool = True,
        mode: str = "token",
        block_size: int = 64,
        causal: bool = False,
    ):
        super().__init__()
        dim, heads = _checks.positive_int("dim", dim), _checks.positive_int("heads", heads)
        _checks.heads_divide(dim, heads)
        if dim // heads not in SUPPORTED_HEAD_DIMS:
            raise ValueError(
                f"head dim dim // heads must be one of {SUPPORTED_HEAD_DIMS} (topk_attention), "
                f"got {dim} // {heads} = {dim // heads}"
            )
        _checks.positive_int("topk", topk)
        _checks.dropout("dropout", dropout)
        _checks.boolean("bias", bias)
        _check_mode(mode, block_size)
        _checks.boolean("causal", causal)
        if causal and mode != "block":
            raise ValueError("causal=True needs mode='block' (the token mode has no causal form)")
        self.dim, self.heads, self.head_dim, self.topk = dim, heads, dim // heads, topk
        self.mode, self.block_size, self.causal = mode, block_size, causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        batch, length, _ = t.shape
        return t.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def _check_inputs(self, x: torch.Tensor, context: torch.Tensor | None) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [batch, tokens, {self.dim}], got {tuple(x.shape)}")
        if context is not None and (
            context.dim() != 3 or context.shape[-1] != self.dim or context.shape[0] != x.shape[0]
        ):
            raise ValueError(
                f"context must have shape [{x.shape[0]}, tokens, {self.dim}] (same batch as x), "
                f"got {tuple(context.shape)}"
            )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(x, context)
        with nvtx_range("fastvision.TopKSparseAttention"):
            if context is None:
                q, k, v = self.qkv(x).chunk(3, dim=-1)
            else:
                weight, bias = self.qkv.weight, self.qkv.bias
                q = F.linear(x, weight[: self.dim], None if bias is None else bias[: self.dim])
                k, v = F.linear(
                    context, weight[self.dim :], None if bias is None else bias[self.dim :]
                ).chunk(2, dim=-1)
            q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
            if self.mode == "block":
                out = block_topk_attention(q, k, v, self.topk, self.block_size, causal=self.causal)
            else:
                out = topk_attention(q, k, v, self.topk)
            out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.dim)
            return self.dropout(self.out_proj(out))

    def extra_repr(self) -> str:
        mode = "" if self.mode == "token" else f", mode='block', block_size={self.block_size}"
        mode += ", causal=True" if self.causal else ""
        return f"dim={self.dim}, heads={self.heads}, topk={self.topk}{mode}"


class TokenRouter(nn.Module):
    """Two-layer MLP giving each token a probability per expert: ``[B, N, dim] -> [B, N, experts]``.

    The softmax runs in float32 so that low-precision activations still give probabilities that
    sum to one and a well-conditioned balance loss.
    """

    def __init__(self, dim: int, num_experts: int, hidden: int):
        super().__init__()
        dim = _checks.positive_int("dim", dim)
        num_experts = _checks.positive_int("num_experts", num_experts)
        hidden = _checks.positive_int("hidden", hidden)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x))).float().softmax(dim=-1)


class AdaptiveSparseAttentionMoE(nn.Module):
    """A token router over ``TopKSparseAttention`` experts with different ``topk`` budgets.

    Routing (``routing``):

    * ``"soft"``: every expert runs on every token; a token's output is the mixture
      ``sum_e p_e * expert_e(x)`` with its router probabilities ``p``.
    * ``"top1"``: each token goes to its most probable expert only, and its output is
      ``p_e* * expert_e*(x)`` (scaled by the probability, so the router gets a gradient). An expert
      computes queries (and output projections) only for the tokens routed to it; those queries
      attend over the keys and values of *all* tokens of their image, projected with the
      expert's own weights. The result therefore equals running every expert on every token and
      selecting the argmax expert's output (``forward_dense_top1``), at a cost in attention that
      follows the number of tokens each expert receives.

      Grouping: tokens are sorted by expert within each image (one stable sort); expert ``e``
      gets a ``[B, M_e]`` batch of queries, ``M_e`` the largest number of tokens any image of the
      batch sends to it, with shorter images padded and their padded outputs dropped. Padding
      keeps one batched attention call per expert (no per-image loop) and the work stays
      proportional to the routed tokens up to the imbalance between images. Reading the
      ``M_e`` sizes costs one device-to-host synchronisation per forward.

    After each forward the module holds:

    * ``aux_loss``: Switch-Transformer load-balancing loss ``balance_weight * E * sum_e f_e * P_e``
      (``f_e``: fraction of tokens whose most probable expert is ``e``; ``P_e``: mean router
      probability of ``e``); a float32 scalar tensor with a gradient to the router (through ``P``;
      ``f`` is a count). Perfectly balanced routing gives ``balance_weight``.
    * ``expert_utilization``: ``[E]`` detached, summing to one: the fraction of tokens routed to
      each expert (``top1``) or the mean router probability (``soft``).

    ``router_hidden`` (default ``dim // 2``) sizes the router MLP. ``output_projection`` adds one
    ``dim x dim`` linear layer after the mixture (used by ``sparse_moe_denoiser`` to match its
    reference architecture). ``mode`` and ``block_size`` choose the experts' selection
    (``TopKSparseAttention``): ``"token"`` (default, the seed's per-query top-k) or ``"block"``
    (``expert_topk`` then counts key blocks of ``block_size`` tokens).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        expert_topk: tuple[int, ...] | list[int] = (32, 64, 128),
        routing: str = "soft",
        balance_weight: float = 0.01,
        *,
        dropout: float = 0.0,
        router_hidden: int | None = None,
        output_projection: bool = False,
        mode: str = "token",
        block_size: int = 64,
    ):
        super().__init__()
        dim, heads = _checks.positive_int("dim", dim), _checks.positive_int("heads", heads)
        _checks.heads_divide(dim, heads)
        expert_topk = _checks.positive_ints("expert_topk", expert_topk)
        _checks.choice("routing", routing, ROUTINGS)
        _checks.non_negative_float("balance_weight", balance_weight)
        _checks.dropout("dropout", dropout)
        _checks.boolean("output_projection", output_projection)
        _check_mode(mode, block_size)
        if router_hidden is None:
            router_hidden = dim // 2
            if router_hidden < 1:
                raise ValueError(f"router_hidden must be >= 1: pass one for dim={dim} (dim // 2 is 0)")
        router_hidden = _checks.positive_int("router_hidden", router_hidden)
        self.dim, self.heads, self.expert_topk = dim, heads, expert_topk
        self.routing = routing
        self.balance_weight = float(balance_weight)
        self.router = TokenRouter(dim, len(expert_topk), router_hidden)
        self.mode, self.block_size = mode, block_size
        self.experts = nn.ModuleList(
            TopKSparseAttention(dim, heads, k, dropout, mode=mode, block_size=block_size) for k in expert_topk
        )
        self.out_proj = nn.Linear(dim, dim) if output_projection else nn.Identity()
        self.aux_loss: torch.Tensor | None = None
        self.expert_utilization: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [batch, tokens, {self.dim}], got {tuple(x.shape)}")

    # ------------------------------------------------------------------------------------ routing
    def _record_balance(self, probs: torch.Tensor, assignment: torch.Tensor) -> None:
        if torch.compiler.is_exporting():
            return  # an exported (inference) program has no training statistics to keep
        routed = F.one_hot(assignment, self.num_experts).float().mean(dim=(0, 1))  # f_e
        mean_prob = probs.mean(dim=(0, 1))  # P_e
        self.aux_loss = self.balance_weight * self.num_experts * (routed * mean_prob).sum()
        usage = routed if self.routing == "top1" else mean_prob
        self.expert_utilization = usage.detach()

    def _soft(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        out = None
        for e, expert in enumerate(self.experts):
            y = expert(x) * probs[..., e : e + 1].to(x.dtype)
            out = y if out is None else out + y
        return out

    def _top1_grouped(self, x: torch.Tensor, probs: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        chosen_prob = probs.gather(-1, assignment.unsqueeze(-1)).to(x.dtype)  # [B, N, 1]
        order = torch.sort(assignment, dim=1, stable=True).indices  # tokens grouped by expert
        counts = F.one_hot(assignment, self.num_experts).sum(dim=1)  # [B, E]
        starts = counts.cumsum(dim=1) - counts
        group_sizes = counts.amax(dim=0).tolist()  # M_e: the one host sync
        # Row `tokens` is a sink for padded slots; it is dropped at the end.
        out = x.new_zeros(batch, tokens + 1, dim)
        for e, expert in enumerate(self.experts):
            size = group_sizes[e]
            if size == 0:
                continue
            slot = torch.arange(size, device=x.device)
            valid = slot < counts[:, e : e + 1]  # [B, M_e]
            token = order.gather(1, (starts[:, e : e + 1] + slot).clamp_max(tokens - 1))
            queries = x.gather(1, token.unsqueeze(-1).expand(batch, size, dim))
            weight = chosen_prob.gather(1, token.unsqueeze(-1)) * valid.unsqueeze(-1)
            y = expert(queries, context=x) * weight
            target = torch.where(valid, token, tokens).unsqueeze(-1).expand(batch, size, dim)
            out = out.scatter_add(1, target, y)
        return out[:, :tokens]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        with nvtx_range("fastvision.AdaptiveSparseAttentionMoE"):
            probs = self.router(x)  # [B, N, E] float32
            if x.shape[0] * x.shape[1] == 0:
                # No tokens: nothing to route; a zero loss that still belongs to the graph.
                self.aux_loss = probs.sum() * 0.0
                self.expert_utilization = torch.zeros(self.num_experts, device=x.device)
                return self.out_proj(x.new_zeros(x.shape))
            assignment = probs.argmax(dim=-1)
            self._record_balance(probs, assignment)
            if self.routing == "soft":
                return self.out_proj(self._soft(x, probs))
            return self.out_proj(self._top1_grouped(x, probs, assignment))

    def forward_dense_top1(self, x: torch.Tensor) -> torch.Tensor:
        """Top-1 routing computed densely: every expert on every token, then the argmax expert's
        output times its probability. Same result as ``routing="top1"`` at the cost of ``"soft"``;
        the reference for tests and benchmarks. Does not update ``aux_loss``."""
        self._check_input(x)
        probs = self.router(x)
        assignment = probs.argmax(dim=-1, keepdim=True)  # [B, N, 1]
        outputs = torch.stack([expert(x) for expert in self.experts], dim=-2)  # [B, N, E, dim]
        index = assignment.unsqueeze(-1).expand(*assignment.shape[:2], 1, self.dim)
        selected = outputs.gather(-2, index).squeeze(-2)  # [B, N, dim]
        return self.out_proj(selected * probs.gather(-1, assignment).to(x.dtype))

    def __getstate__(self):
        # aux_loss is a per-forward graph node: copies and pickles start without it (deepcopy of a
        # non-leaf tensor would fail, e.g. when an EMA copy of a trained model is made).
        state = super().__getstate__()
        state = dict(state)
        state["aux_loss"] = None
        return state

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, expert_topk={self.expert_topk}, routing={self.routing!r}, "
            f"balance_weight={self.balance_weight}"
            + ("" if self.mode == "token" else f", mode='block', block_size={self.block_size}")
        )
