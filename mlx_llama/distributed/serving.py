"""`serve --pipeline`: rank 0's engine worker, which ends the other ranks' stage loops when it stops."""

from __future__ import annotations

from typing import Any

from mlx_llama.distributed.pipeline import Pipeline
from mlx_llama.server.worker import EngineWorker


class PipelineEngineWorker(EngineWorker):
    """An `EngineWorker` whose engine steps run through `pipeline`.

    uvicorn ends the process by re-raising SIGTERM right after the app's shutdown,
    where this worker is stopped: the other ranks are told to finish then, or they
    would only learn it from the closed connection (and exit with an error).
    """

    def __init__(self, engine: Any, pipeline: Pipeline, **kwargs: Any) -> None:
        super().__init__(engine, **kwargs)
        self._pipeline = pipeline

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        if not self._thread.is_alive():  # a step still running owns the connection: leave it
            self._pipeline.stop(aborted=self.error is not None)
