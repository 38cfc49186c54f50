"""moe-core: the shared runtime for running mixture-of-experts LLMs.

The public surface: read a checkpoint's shape (`ModelSpec`), load it as our own PyTorch model
(`load_model`), run it (`MoEForCausalLM`, `KVCache`, `generate`), plug other ways of running
experts into its MoE blocks (`ExpertExecutor`), and offload experts to host memory
(`HostExpertStore`, `GpuSlotPool`, `make_copy_engine`, `install_offloading`, `EvictionPolicy`).
"""

from moe_core.architectures import supported_architectures
from moe_core.attention_inputs import AttentionInputs, position_mask
from moe_core.cli_app import tool_app
from moe_core.decode_runner import CaptureContext, DecodeRunner, GraphHooks, graph_blockers
from moe_core.devices import check_device
from moe_core.dtypes import DtypeError, parse_dtype, run_dtype
from moe_core.embedded_model import TINY_MODEL_NAME, tiny_model_path
from moe_core.errors import (
    CheckpointError,
    ConfigError,
    DeviceError,
    InputFileError,
    MoECoreError,
    MoEError,
    OutputError,
    OutputInUseError,
    RequestError,
    SettingError,
    UnsupportedArchitectureError,
    bad_lines_message,
)
from moe_core.expert_id import ExpertId
from moe_core.experts import ExpertExecutor, LocalExperts
from moe_core.file_lock import lock_holder, open_locked
from moe_core.generation import GenerationResult, generate
from moe_core.known_shapes import known_shapes
from moe_core.kv_cache import KVCache
from moe_core.kv_store import DecodeAttentionStore, KVStore, SequenceKV
from moe_core.layers.attention import attend
from moe_core.loader import load_model, resolve_model_path
from moe_core.model import AttentionBranch, DecoderLayer, MixObserver, MoEForCausalLM
from moe_core.moe_block import MoEBlock
from moe_core.offload.cache_plans import (
    PREFETCH_MODES,
    CachePlan,
    CachePlanFactory,
    PrefetcherFactory,
    cache_plan,
    parse_named,
)
from moe_core.offload.copy_engine import CopyEngine, CopyLane, CopyTicket, CpuCopyEngine
from moe_core.offload.copy_engines import make_copy_engine
from moe_core.offload.fp8 import FP8
from moe_core.offload.gpu_slots import GpuSlotPool
from moe_core.offload.host_store import HostExpertStore
from moe_core.offload.layout import ExpertLayout
from moe_core.offload.loading import (
    OffloadedModel,
    check_fetch_lanes,
    fits_on_device,
    load_offloaded,
)
from moe_core.offload.lookahead_prefetcher import LookaheadPrefetcher, lookahead_scores
from moe_core.offload.mapped_fetch import MappedFetcher
from moe_core.offload.mapped_rows import MappedRowGather, mapped_rows_unsupported
from moe_core.offload.offloaded_executor import CpuComputeRule, OffloadedExecutor
from moe_core.offload.packing import pack_model
from moe_core.offload.policy import EvictionPolicy, LFUPolicy, LRUPolicy
from moe_core.offload.prefetch_counts import LayerPrefetches
from moe_core.offload.prefetcher import Prefetcher
from moe_core.offload.prefill_ring import PREFILL_MODES, PrefillMode, PrefillRing
from moe_core.offload.residency import Residency, ResidencyTable
from moe_core.offload.runtime import FetchMode, OffloadKind, OffloadRuntime, install_offloading
from moe_core.offload.slot_cache import ExpertSlotCache
from moe_core.offload.stats import OffloadStats
from moe_core.offload.streaming_executor import FP8_WORKSPACE_BYTES, StreamingExecutor
from moe_core.output_path import check_output_path, write_output_text
from moe_core.parallel import (
    Collective,
    ExpertParallelExecutor,
    ExpertShardPlan,
    RankGroup,
    free_port,
    install_expert_parallel,
    join_ranks,
)
from moe_core.replay_routing import ReplayRouting, RoutingTape
from moe_core.request_limits import (
    TRUNCATE_SIDES,
    Truncate,
    fit_prompt,
    fit_prompts,
    parse_truncate,
)
from moe_core.routing import route
from moe_core.routing_control import (
    TapeLoader,
    UniformRouting,
    check_routing,
    replay_routing,
    routing_for,
    uniform_routing,
    zipf_routing,
)
from moe_core.sampling import SamplingParams, sample_next
from moe_core.sizes import format_bytes, parse_bytes
from moe_core.spec import AttentionSpec, ModelSpec, MoESpec, RopeSpec, RouterSpec
from moe_core.staged_output import StagedOutput
from moe_core.static_kv_cache import StaticKVCache
from moe_core.tiny_checkpoints import TINY_KINDS, build_tiny_checkpoint
from moe_core.tokenizer import load_tokenizer, render_chat, word_tokenizer
from moe_core.zipf_routing import ZipfRouting

__version__ = "0.1.0"

__all__ = [
    "FP8",
    "FP8_WORKSPACE_BYTES",
    "PREFETCH_MODES",
    "PREFILL_MODES",
    "TINY_KINDS",
    "TINY_MODEL_NAME",
    "TRUNCATE_SIDES",
    "AttentionBranch",
    "AttentionInputs",
    "AttentionSpec",
    "CachePlan",
    "CachePlanFactory",
    "CaptureContext",
    "CheckpointError",
    "Collective",
    "ConfigError",
    "CopyEngine",
    "CopyLane",
    "CopyTicket",
    "CpuComputeRule",
    "CpuCopyEngine",
    "DecodeAttentionStore",
    "DecodeRunner",
    "DecoderLayer",
    "DeviceError",
    "DtypeError",
    "EvictionPolicy",
    "ExpertExecutor",
    "ExpertId",
    "ExpertLayout",
    "ExpertParallelExecutor",
    "ExpertShardPlan",
    "ExpertSlotCache",
    "FetchMode",
    "GenerationResult",
    "GpuSlotPool",
    "GraphHooks",
    "HostExpertStore",
    "InputFileError",
    "KVCache",
    "KVStore",
    "LFUPolicy",
    "LRUPolicy",
    "LayerPrefetches",
    "LocalExperts",
    "LookaheadPrefetcher",
    "MappedFetcher",
    "MappedRowGather",
    "MixObserver",
    "MoEBlock",
    "MoECoreError",
    "MoEError",
    "MoEForCausalLM",
    "MoESpec",
    "ModelSpec",
    "OffloadKind",
    "OffloadRuntime",
    "OffloadStats",
    "OffloadedExecutor",
    "OffloadedModel",
    "OutputError",
    "OutputInUseError",
    "Prefetcher",
    "PrefetcherFactory",
    "PrefillMode",
    "PrefillRing",
    "RankGroup",
    "ReplayRouting",
    "RequestError",
    "Residency",
    "ResidencyTable",
    "RopeSpec",
    "RouterSpec",
    "RoutingTape",
    "SamplingParams",
    "SequenceKV",
    "SettingError",
    "StagedOutput",
    "StaticKVCache",
    "StreamingExecutor",
    "TapeLoader",
    "Truncate",
    "UniformRouting",
    "UnsupportedArchitectureError",
    "ZipfRouting",
    "__version__",
    "attend",
    "bad_lines_message",
    "build_tiny_checkpoint",
    "cache_plan",
    "check_device",
    "check_fetch_lanes",
    "check_output_path",
    "check_routing",
    "fit_prompt",
    "fit_prompts",
    "fits_on_device",
    "format_bytes",
    "free_port",
    "generate",
    "graph_blockers",
    "install_expert_parallel",
    "install_offloading",
    "join_ranks",
    "known_shapes",
    "load_model",
    "load_offloaded",
    "load_tokenizer",
    "lock_holder",
    "lookahead_scores",
    "make_copy_engine",
    "mapped_rows_unsupported",
    "open_locked",
    "pack_model",
    "parse_bytes",
    "parse_dtype",
    "parse_named",
    "parse_truncate",
    "position_mask",
    "render_chat",
    "replay_routing",
    "resolve_model_path",
    "route",
    "routing_for",
    "run_dtype",
    "sample_next",
    "supported_architectures",
    "tiny_model_path",
    "tool_app",
    "uniform_routing",
    "word_tokenizer",
    "write_output_text",
    "zipf_routing",
]
