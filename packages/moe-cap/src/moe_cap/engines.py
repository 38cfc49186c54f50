"""The in-process engines `moe-cap run --engine NAME` drives, imported only when asked for:
moe-cap does not depend on moe-gen or moe-infinity, and a missing one is one error line."""

from __future__ import annotations

import importlib
from types import ModuleType

from moe_cap.core_engine import CoreStreamingEngine
from moe_cap.engine_options import EngineOptions
from moe_cap.errors import TargetError
from moe_cap.moe_gen_engine import MoEGenOffline
from moe_cap.streaming_engine import StreamingEngine

__all__ = ["import_engine_package", "moe_gen_engine", "moe_infinity_engine"]


def import_engine_package(name: str) -> ModuleType:
    """`moe_gen` or `moe_infinity`.

    Raises:
        TargetError: the package is not installed (naming what to install).
    """
    module = name.replace("-", "_")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name != module:
            raise
        raise TargetError(f"--engine {name} needs the {name} package, which is not installed "
                          f"(install it beside moe-cap: pip install {name})") from None


def moe_gen_engine(options: EngineOptions) -> MoEGenOffline:
    """moe-gen's offline engine over `options.model`."""
    return MoEGenOffline(import_engine_package("moe-gen"), options)


def moe_infinity_engine(options: EngineOptions) -> StreamingEngine:
    """The moe-infinity engine: until its in-process serving engine lands, moe-core's offloaded
    generation at batch 1 (`CoreStreamingEngine`), labelled as such in the record. Swapping in
    moe-infinity's own engine is a change to this function only."""
    package = import_engine_package("moe-infinity")
    return CoreStreamingEngine.load(
        options, f"moe-infinity {package.__version__} (interim: moe-core generation at batch 1)")
