"""moe-cap: cost, accuracy and performance benchmarking of MoE systems (after the MoE-CAP paper,
arXiv:2412.07067), with its metrics corrected: top-k experts per token, exact attention FLOPs,
KV reads at the cache's dtype, dense peaks, time-weighted aggregates and a cost model that
includes the host.

The public surface: count a step's bytes and FLOPs (`step_cost`), the experts it activates
(`expected_distinct_experts`, `activated_experts`), the utilisation of measured steps
(`utilisation`, `summarise`), the hardware it runs on (`load_hardware_table`, `detect_gpu`), the
bounds it cannot beat (`step_bounds`, `metrics_sweep`), and what a run cost (`RunRecord`,
`price_run`); and, to measure systems, the runner (`run_benchmark` with a `ServerSpec` or
`EngineOptions`, a workload of `WorkItem`s, a `LoadPattern`), accuracy tasks (GSM8K, perplexity,
multiple choice: `run_scoring`) and the CAP report (`write_report`).
"""

from moe_cap.accuracy_result import AccuracyResult
from moe_cap.activated_experts import (
    ActivatedExperts,
    activated_experts,
    count_distinct_experts,
    expected_distinct_experts,
)
from moe_cap.cost import CostConfig, CostReport, EnergyUse, price_run
from moe_cap.detect import DeviceProperties, detect_gpu, local_device_properties
from moe_cap.energy import NvmlEnergyMeter
from moe_cap.engine_options import EngineOptions
from moe_cap.errors import HardwareError, MoECapError, RunRecordError, TargetError, WorkloadError
from moe_cap.gsm8k import answers_match, extract_final_number
from moe_cap.hardware import (
    NO_GPU,
    CpuSpec,
    DramSpec,
    GpuSpec,
    HardwareTable,
    MeasuredPeaks,
    load_hardware_table,
    names_no_gpu,
)
from moe_cap.latency_stats import Percentiles, Slo
from moe_cap.length_distribution import LengthDistribution, parse_length
from moe_cap.load_pattern import LoadPattern
from moe_cap.precision import bits_per_element, parse_precision, storage_bytes
from moe_cap.report import Report, write_report
from moe_cap.request_result import RequestResult
from moe_cap.roofline import MetricsRow, StepBounds, host_expert_share, metrics_sweep, step_bounds
from moe_cap.run_benchmark import RunConfig, RunOutcome, ServerSpec, run_benchmark
from moe_cap.run_record import RunRecord, StepRecord
from moe_cap.scoring_run import ScoringConfig, run_scoring
from moe_cap.serving_summary import ServingSummary
from moe_cap.step_cost import Chunk, StepCost, decode_batch, prefill_batch, step_cost
from moe_cap.target import GenerationSettings
from moe_cap.utilisation import (
    PeakRates,
    StepSample,
    Utilisation,
    UtilisationSummary,
    run_peaks,
    run_samples,
    summarise,
    utilisation,
)
from moe_cap.workload import (
    SYNTHETIC_WORDS,
    SyntheticSpec,
    WorkItem,
    read_workload,
    synthetic_workload,
)

__version__ = "0.1.0"

__all__ = [
    "NO_GPU",
    "SYNTHETIC_WORDS",
    "AccuracyResult",
    "ActivatedExperts",
    "Chunk",
    "CostConfig",
    "CostReport",
    "CpuSpec",
    "DeviceProperties",
    "DramSpec",
    "EnergyUse",
    "EngineOptions",
    "GenerationSettings",
    "GpuSpec",
    "HardwareError",
    "HardwareTable",
    "LengthDistribution",
    "LoadPattern",
    "MeasuredPeaks",
    "MetricsRow",
    "MoECapError",
    "NvmlEnergyMeter",
    "PeakRates",
    "Percentiles",
    "Report",
    "RequestResult",
    "RunConfig",
    "RunOutcome",
    "RunRecord",
    "RunRecordError",
    "ScoringConfig",
    "ServerSpec",
    "ServingSummary",
    "Slo",
    "StepBounds",
    "StepCost",
    "StepRecord",
    "StepSample",
    "SyntheticSpec",
    "TargetError",
    "Utilisation",
    "UtilisationSummary",
    "WorkItem",
    "WorkloadError",
    "__version__",
    "activated_experts",
    "answers_match",
    "bits_per_element",
    "count_distinct_experts",
    "decode_batch",
    "detect_gpu",
    "expected_distinct_experts",
    "extract_final_number",
    "host_expert_share",
    "load_hardware_table",
    "local_device_properties",
    "metrics_sweep",
    "names_no_gpu",
    "parse_length",
    "parse_precision",
    "prefill_batch",
    "price_run",
    "read_workload",
    "run_benchmark",
    "run_peaks",
    "run_samples",
    "run_scoring",
    "step_bounds",
    "step_cost",
    "storage_bytes",
    "summarise",
    "synthetic_workload",
    "utilisation",
    "write_report",
]
