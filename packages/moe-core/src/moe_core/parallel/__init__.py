"""Expert parallelism over several processes (one device each): the shard plan, the ranks'
groups, and the executor that computes a rank's own experts and sums over the ranks. See
docs/decisions/0013-expert-parallel-serving.md.
"""

from moe_core.parallel.expert_parallel import (
    Collective,
    ExpertParallelExecutor,
    install_expert_parallel,
)
from moe_core.parallel.rank_group import RankGroup, free_port, join_ranks
from moe_core.parallel.shard_plan import ExpertShardPlan

__all__ = [
    "Collective",
    "ExpertParallelExecutor",
    "ExpertShardPlan",
    "RankGroup",
    "free_port",
    "install_expert_parallel",
    "join_ranks",
]
