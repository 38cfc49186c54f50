"""The job's run record, kept beside its output so that it covers every run of the job.

A job may take several runs (it resumes after an interruption), and its last run may have
nothing left to do; the record `--json` writes is the job's: the steps of every run of it,
stored in `<output>.run-record.json` as each run ends (also when it is interrupted by Ctrl-C or
SIGTERM; a run killed outright loses its steps from the record, not its results). Runs with
another model, dtype, device, layer count or benchmark routing (`routing`: it decides which
experts each step reads) start the record afresh. The file is moe-cap's run record format; one
that is not a moe-gen record is never overwritten.
"""

from __future__ import annotations

import json
from pathlib import Path

from moe_core import OutputError, write_output_text

__all__ = ["JobRecord"]

_SAME_RUN = ("model", "weight_dtype", "kv_dtype", "expert_dtype", "gpu", "cpu", "num_layers",
             "routing")
_SUMMED = ("wall_seconds", "input_tokens", "output_tokens")
# Measured energy adds up only where every run measured it; otherwise it is left out (moe-cap
# then estimates the whole job's, and says so).
_ENERGY = ("gpu_energy_j", "cpu_energy_j", "dram_energy_j")


class JobRecord:
    """The stored record of a job's earlier runs, and how a new run joins it.

    Attributes:
        path: `<output>.run-record.json`.
        stored: The record of the earlier runs (None: none yet).
    """

    def __init__(self, output: str | Path, fresh: bool) -> None:
        """Read the stored record of the job writing `output`.

        Args:
            output: The job's output file.
            fresh: The output holds no results yet (a stored record is from an earlier job).

        Raises:
            OutputError: the file exists and is not a moe-gen run record.
        """
        output = Path(output)
        self.path = output.with_name(output.name + ".run-record.json")
        self.stored = None if not self.path.exists() else self._read()
        if fresh:
            self.stored = None

    def _read(self) -> dict[str, object]:
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if not (isinstance(record, dict) and str(record.get("engine", "")).startswith("moe-gen")
                and isinstance(record.get("steps"), list)):
            raise OutputError(f"{self.path}: not a moe-gen run record, so moe-gen will not "
                              "overwrite it (move it away, or choose another --output)")
        return record

    def joined(self, run: dict[str, object] | None) -> dict[str, object] | None:
        """The job's record with `run` (this run's record, None if it ran no step) added."""
        if run is None or self.stored is None:
            return run or self.stored
        if any(self.stored.get(key) != run.get(key) for key in _SAME_RUN):
            return run
        joined = dict(run)
        for key in _SUMMED:
            joined[key] = self.stored[key] + run[key]  # type: ignore[operator]
        for key in _ENERGY:
            if key in self.stored and key in run:
                joined[key] = self.stored[key] + run[key]  # type: ignore[operator]
            else:
                joined.pop(key, None)
        joined["steps"] = [*self.stored["steps"], *run["steps"]]  # type: ignore[misc]
        return joined

    def save(self, record: dict[str, object] | None) -> None:
        """Store the job's record (nothing when there is none)."""
        if record is not None:
            write_output_text(self.path, json.dumps(record) + "\n", "the job's run record")
