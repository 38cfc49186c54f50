"""moe-infinity: latency-first serving with activation-aware expert offloading.

After the MoE-Infinity paper (Xue et al., arXiv:2401.14361). Part 1: trace which experts each
request activates (`ActivationTracer`, `trace_prompts`), keep past traces (`TraceCollection`),
predict the experts a running request will need (`RequestPredictor`), and replay traces through
a simulated GPU expert cache under LRU, LFU, activation-aware and Belady policies (`simulate`,
`evaluate`). Part 2: the predictor and the activation-aware policy drive moe-core's real
offload runtime (`ActivationPrefetcher`, `activation_plan`: `moe-core generate --policy
activation`), trace files replay as benchmark routing (`load_routing_tape`), and
`moe-infinity serve` (an OpenAI-compatible server with continuous batching over offloaded
experts, traces recorded live) and `moe-infinity chat` live in `moe_infinity.serving`.
"""

from moe_infinity.activation_prefetcher import ActivationPrefetcher
from moe_infinity.cache_model import ExpertCache
from moe_infinity.cache_plan import activation_plan
from moe_infinity.collection import Match, TraceCollection
from moe_infinity.errors import MoEInfinityError, TraceFileError
from moe_infinity.evaluation import EvaluationPlan, EvaluationReport, evaluate
from moe_infinity.model_shape import ModelShape
from moe_infinity.online_recall import OnlineRecall
from moe_infinity.policies import ActivationAwarePolicy, BeladyPolicy
from moe_infinity.policy_setup import DEFAULT_POLICIES, PolicySetup, parse_policies
from moe_infinity.predictor import SOURCES, PredictorConfig, RequestPredictor
from moe_infinity.prompts import Prompt, read_prompts, sample_prompts_path
from moe_infinity.routing_tape import load_routing_tape, routing_tape
from moe_infinity.simulator import (
    H200_PCIE_BYTES_PER_S,
    SimulationConfig,
    SimulationResult,
    access_string,
    simulate,
)
from moe_infinity.source_recall import SourceRecall, measure_recall
from moe_infinity.trace import RequestTrace, TraceSet
from moe_infinity.trace_file import load_traces, save_traces
from moe_infinity.trace_run import TraceConfig, trace_prompts
from moe_infinity.tracer import ActivationTracer

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_POLICIES",
    "H200_PCIE_BYTES_PER_S",
    "SOURCES",
    "ActivationAwarePolicy",
    "ActivationPrefetcher",
    "ActivationTracer",
    "BeladyPolicy",
    "EvaluationPlan",
    "EvaluationReport",
    "ExpertCache",
    "Match",
    "MoEInfinityError",
    "ModelShape",
    "OnlineRecall",
    "PolicySetup",
    "PredictorConfig",
    "Prompt",
    "RequestPredictor",
    "RequestTrace",
    "SimulationConfig",
    "SimulationResult",
    "SourceRecall",
    "TraceCollection",
    "TraceConfig",
    "TraceFileError",
    "TraceSet",
    "__version__",
    "access_string",
    "activation_plan",
    "evaluate",
    "load_routing_tape",
    "load_traces",
    "measure_recall",
    "parse_policies",
    "read_prompts",
    "routing_tape",
    "sample_prompts_path",
    "save_traces",
    "simulate",
    "trace_prompts",
]
