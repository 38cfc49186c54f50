"""A rank of the gloo test in test_expert_parallel.py (not collected): rank 0 runs `run_rank`
in the test's process, the others run this file as a script,

    python expert_parallel_worker.py RANK WORLD PORT PROMPTS_JSON OUT_JSON

Each joins the ranks on the CPU (gloo) and reports (to OUT_JSON): how far the sharded MoE block's
output is from the unsharded block's on the same input, and the greedy tokens of the embedded
model with this rank's shard of the experts offloaded and the
other ranks' contributions summed in.
"""

from __future__ import annotations

import json
import sys

import torch
from moe_core import (
    ExpertShardPlan,
    ModelSpec,
    MoEBlock,
    MoESpec,
    RankGroup,
    RouterSpec,
    generate,
    install_expert_parallel,
    join_ranks,
    load_offloaded,
    load_tokenizer,
    tiny_model_path,
)
from moe_core.parallel.expert_parallel import ExpertParallelExecutor

PROMPTS = ["Once upon a time, there was a little fox who", "def fibonacci(n):"]
MAX_NEW_TOKENS = 8


def block_difference(rank: int, world: int, group: RankGroup) -> float:
    """Largest |sharded - unsharded| of a random MoE block (float32) on random tokens."""
    torch.manual_seed(0)  # every rank builds the same block and input
    spec = MoESpec(num_experts=8, expert_intermediate_size=32,
                   router=RouterSpec("softmax_topk", top_k=3, normalize=True),
                   shared_intermediate_size=16)
    block = MoEBlock(spec, hidden_size=24, layer=0)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.3)
    x = torch.randn(3, 5, 24)  # [B, T, D]
    with torch.no_grad():
        whole = block(x)
        plan = ExpertShardPlan.round_robin([0], spec.num_experts, world)
        owned = plan.owned_mask(0, rank)
        block.set_executor(ExpertParallelExecutor(block.experts, owned, group))
        sharded = block(x)
    return float((sharded - whole).abs().max())


def greedy_tokens(rank: int, world: int, group: RankGroup,
                  prompts: list[list[int]]) -> list[list[int]]:
    """The embedded model's greedy tokens, this rank holding its shard of the experts (48 of
    96) in a cache of 6 slots (so experts are evicted and fetched again)."""
    plan = _plan(world)
    loaded = load_offloaded("tiny-moe", "cpu", 6 * 491_520, experts=plan.owned(rank))
    install_expert_parallel(loaded.model, plan, group)
    out = []
    for ids in prompts:
        result = generate(loaded.model, [ids], max_new_tokens=MAX_NEW_TOKENS)
        out.append(result.tokens[0, : result.lengths[0]].tolist())
    assert loaded.runtime.snapshot().evictions > 0
    return out


def _plan(world: int) -> ExpertShardPlan:
    spec = ModelSpec.from_pretrained(tiny_model_path())
    return ExpertShardPlan.round_robin(list(spec.moe_layers), spec.moe.num_experts, world)


def prompt_ids() -> list[list[int]]:
    """`PROMPTS` tokenised (rank 0 hands them to the others: no tokenizer there)."""
    tokenizer = load_tokenizer(tiny_model_path())
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def run_rank(rank: int, world: int, port: int, prompts: list[list[int]]) -> dict[str, object]:
    """Join the ranks, run both checks, leave; the results."""
    group = join_ranks(rank, world, port, "cpu", timeout_s=60)
    try:
        return {"rank": rank, "block_difference": block_difference(rank, world, group),
                "tokens": greedy_tokens(rank, world, group, prompts)}
    finally:
        group.close()


def main() -> None:
    rank, world, port = (int(a) for a in sys.argv[1:4])
    result = run_rank(rank, world, port, json.loads(sys.argv[4]))
    with open(sys.argv[5], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
