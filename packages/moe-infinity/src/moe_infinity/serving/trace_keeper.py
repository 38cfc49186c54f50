"""The server's trace collection: loaded at start, fed every finished request's EAM, saved
atomically every `save_every` requests and at shutdown.

A save stages the file beside its name (`<file>.partial`, locked) and renames it into place
(`moe_core.StagedOutput`), so a crash or kill mid-save leaves the previous collection intact
and the file is always a whole, checksummed collection.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from moe_core import SettingError, StagedOutput, check_output_path

from moe_infinity.collection import TraceCollection
from moe_infinity.model_shape import ModelShape

__all__ = ["TraceKeeper"]


class TraceKeeper:
    """Owns the collection (touched by the engine thread only).

    Attributes:
        collection: The EAMs of past requests.
        path: Where it is saved (None: kept in memory only).
        save_every: Requests between saves (0: only at shutdown).
        num_added: EAMs added since start.
    """

    def __init__(self, shape: ModelShape, path: Path | None, capacity: int,
                 save_every: int) -> None:
        """Load `path` if it exists (it must be a collection of this model), else start empty.

        Raises:
            TraceFileError: `path` is not a collection file of this model.
            OutputError: `path` cannot be written (checked now, not at the first save).
            SettingError: a negative `save_every`.
        """
        if save_every < 0:
            raise SettingError(f"--save-every must be >= 0, got {save_every}")
        self.path = path
        self.save_every = save_every
        self.num_added = 0
        self._unsaved = 0
        if path is not None and path.exists():
            self.collection = TraceCollection.load(path, expect=shape)
        else:
            self.collection = TraceCollection(shape, capacity)
        if path is not None:
            check_output_path(path, "--traces")

    def add(self, eam: np.ndarray) -> None:
        """Add a finished request's EAM `[L, E]` (an all-zero one is skipped); save when due."""
        if not eam.any():
            return
        self.collection.add(eam)
        self.num_added += 1
        self._unsaved += 1
        if self.save_every and self._unsaved >= self.save_every:
            self.save()

    def save(self) -> Path | None:
        """Write the collection now (if it has a path); returns the path written."""
        if self.path is None:
            return None
        with StagedOutput(self.path, "--traces") as staged:
            self.collection.save(staged.partial)
        self._unsaved = 0
        return self.path
