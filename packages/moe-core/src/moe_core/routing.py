"""Routers: from router logits to the chosen experts and their weights.

Dimension key: T tokens, E routed experts, K experts per token, N expert groups.

Each rule follows its paper and transformers' implementation exactly (scores in float32):
- `softmax_topk`: softmax over all experts, keep the top K, optionally renormalise
  (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2 `greedy`).
- `group_limited_greedy` (DeepSeek-V2, arXiv:2405.04434 §2.1.2): the experts are split into N
  groups, a group scores its best expert, each token draws its K experts from its best
  `topk_groups` groups only.
- `noaux_tc` (DeepSeek-V3, arXiv:2412.19437 §2.1.2): sigmoid affinities; a per-expert bias (learnt
  for load balance) shifts which experts are *chosen* but not their weights; a group scores the
  sum of its two best biased affinities.
"""

from __future__ import annotations

import torch

from moe_core.kernels import softmax_topk
from moe_core.spec import RouterSpec

__all__ = ["route"]


def _limit_to_groups(scores: torch.Tensor, group_scores: torch.Tensor, topk_groups: int,
                     fill: float) -> torch.Tensor:
    """Set to `fill` the scores `[T, E]` of experts outside each token's best groups.

    Each token keeps the experts of its best `topk_groups` groups.
    """
    t, num_groups = group_scores.shape
    best = torch.topk(group_scores, k=topk_groups, dim=-1, sorted=False).indices  # [T, topk_groups]
    group_mask = torch.zeros_like(group_scores).scatter_(1, best, 1)  # [T, N]
    expert_mask = group_mask.unsqueeze(-1).expand(t, num_groups, scores.shape[-1] // num_groups)
    return scores.masked_fill(~expert_mask.reshape(t, -1).bool(), fill)


def route(logits: torch.Tensor, spec: RouterSpec,
          score_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose experts for each token.

    Args:
        logits: Router logits `[T, E]`, any float dtype.
        spec: The routing rule.
        score_bias: DeepSeek-V3's `e_score_correction_bias` `[E]` (`noaux_tc` only).

    Returns:
        `(expert_ids [T, K] int64, weights [T, K] float32)`.
    """
    k = spec.top_k
    if spec.method == "noaux_tc":
        scores = logits.to(torch.float32).sigmoid()  # [T, E]
        biased = scores if score_bias is None else scores + score_bias.to(torch.float32)
        if spec.num_groups > 1:
            t = biased.shape[0]
            grouped = biased.view(t, spec.num_groups, -1)  # [T, N, E/N]
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, N]
            # -inf, as transformers does (DeepSeek's own code used 0, which can pick an expert
            # of a dropped group when the biased scores of the kept groups are negative).
            biased = _limit_to_groups(biased, group_scores, spec.topk_groups, float("-inf"))
        ids = torch.topk(biased, k=k, dim=-1, sorted=False).indices  # [T, K]
        weights = scores.gather(1, ids)  # the bias picks experts; weights come from raw scores
        if spec.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * spec.scaling_factor

    if logits.is_cuda and spec.method == "softmax_topk":
        # One fused kernel on the GPU (softmax, top-k, renormalisation: five kernels in torch).
        return softmax_topk(logits, k, spec.normalize, spec.scaling_factor)
    scores = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
    if spec.method == "group_limited_greedy":
        t = scores.shape[0]
        group_scores = scores.view(t, spec.num_groups, -1).max(dim=-1).values  # [T, N]
        scores = _limit_to_groups(scores, group_scores, spec.topk_groups, 0.0)
    weights, ids = torch.topk(scores, k=k, dim=-1)  # [T, K]
    if spec.normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights * spec.scaling_factor
