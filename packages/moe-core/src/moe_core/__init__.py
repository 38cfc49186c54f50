"""moe-core: the shared runtime for running mixture-of-experts LLMs.

The public surface: read a checkpoint's shape (`ModelSpec`), load it as our own PyTorch model
(`load_model`), run it (`MoEForCausalLM`, `KVCache`, `generate`), and plug other ways of running
experts into its MoE blocks (`ExpertExecutor`).
"""

from moe_core.architectures import supported_architectures
from moe_core.dtypes import DtypeError, parse_dtype
from moe_core.embedded_model import TINY_MODEL_NAME, tiny_model_path
from moe_core.errors import (
    CheckpointError,
    ConfigError,
    MoECoreError,
    UnsupportedArchitectureError,
)
from moe_core.expert_id import ExpertId
from moe_core.experts import ExpertExecutor, LocalExperts
from moe_core.generation import GenerationResult, generate
from moe_core.known_shapes import known_shapes
from moe_core.kv_cache import KVCache
from moe_core.loader import load_model, resolve_model_path
from moe_core.model import MoEForCausalLM
from moe_core.moe_block import MoEBlock
from moe_core.routing import route
from moe_core.sampling import SamplingParams
from moe_core.sizes import format_bytes, parse_bytes
from moe_core.spec import AttentionSpec, ModelSpec, MoESpec, RopeSpec, RouterSpec
from moe_core.tokenizer import load_tokenizer, render_chat

__version__ = "0.1.0"

__all__ = [
    "TINY_MODEL_NAME",
    "AttentionSpec",
    "CheckpointError",
    "ConfigError",
    "DtypeError",
    "ExpertExecutor",
    "ExpertId",
    "GenerationResult",
    "KVCache",
    "LocalExperts",
    "MoEBlock",
    "MoECoreError",
    "MoEForCausalLM",
    "MoESpec",
    "ModelSpec",
    "RopeSpec",
    "RouterSpec",
    "SamplingParams",
    "UnsupportedArchitectureError",
    "__version__",
    "format_bytes",
    "generate",
    "known_shapes",
    "load_model",
    "load_tokenizer",
    "parse_bytes",
    "parse_dtype",
    "render_chat",
    "resolve_model_path",
    "route",
    "supported_architectures",
    "tiny_model_path",
]
