"""moe-gen: Offline, throughput-first batch generation with module-based batching.

After the MoE-Gen paper (arXiv:2503.09716): a large batch carried through each module, experts
streamed once per step, KV in host pages, batch sizes chosen by a planner from an on-device
profile.
"""

from moe_gen.api import Defaults, generate
from moe_gen.errors import MoEGenError
from moe_gen.job import JobConfig, JobOutcome, RayConfig, run_job
from moe_gen.plan import Plan, Prediction
from moe_gen.ray_data import generate_dataset
from moe_gen.requests import GenRequest, InputError, read_requests
from moe_gen.sequence import GenResult

__version__ = "0.1.0"

__all__ = ["Defaults", "GenRequest", "GenResult", "InputError", "JobConfig", "JobOutcome",
           "MoEGenError", "Plan", "Prediction", "RayConfig", "__version__", "generate",
           "generate_dataset", "read_requests", "run_job"]
