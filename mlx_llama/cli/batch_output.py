"""Where batch mode's answers go: checked before any work, kept as they finish, written atomically.

While a run is going, every finished answer is appended (and flushed) to
`OUT.partial.jsonl` as `{"index", "input", "output"}`; at the end `OUT` gets the
whole `[{"input", "output"}, ...]` list in input order through a temporary file
renamed over it, and the partial file is removed.  A run that fails part-way
leaves the finished answers in the partial file and says so.  `-` writes the
JSON to stdout instead (nothing is kept on a failure then).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import IO, Any

from mlx_llama.errors import MlxLlamaError
from mlx_llama.files import replaced_atomically


def write_json_atomically(path: Path, data: Any) -> None:
    """Write `data` to `path` through a renamed temporary file, with a normal file's mode."""
    with replaced_atomically(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
        f.write("\n")


class BatchOutput:
    def __init__(self, target: Path, force: bool) -> None:
        self.to_stdout = str(target) == "-"
        self.path = target
        self.partial = target.with_name(target.name + ".partial.jsonl")
        self._partial_file: IO[str] | None = None
        self.done = 0
        if not self.to_stdout:
            self._check(force)

    def _check(self, force: bool) -> None:
        """Refuse a target that could not be written, before the model is even loaded."""
        folder = self.path.parent
        if not folder.is_dir():
            raise MlxLlamaError(f"cannot write {self.path}: {folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise MlxLlamaError(f"cannot write {self.path}: {folder} is not writable")
        if self.path.is_dir():
            raise MlxLlamaError(f"{self.path} is a folder")
        if self.path.exists() and not force:
            raise MlxLlamaError(f"{self.path} exists; pass --force to overwrite it")
        if self.partial.exists() and not force:
            raise MlxLlamaError(
                f"{self.partial} holds answers of an interrupted run; move it away or pass --force"
            )

    def add(self, index: int, prompt: str, answer: str) -> None:
        """Keep one finished answer at once (in the partial file)."""
        self.done += 1
        if self.to_stdout:
            return
        if self._partial_file is None:
            self._partial_file = open(self.partial, "w", encoding="utf-8")
        json.dump({"index": index, "input": prompt, "output": answer}, self._partial_file, ensure_ascii=False)
        self._partial_file.write("\n")
        self._partial_file.flush()

    def finish(self, results: list[dict[str, str]]) -> None:
        self._close()
        if self.to_stdout:
            json.dump(results, sys.stdout, ensure_ascii=False, indent=2)
            sys.stdout.write("\n")
            return
        write_json_atomically(self.path, results)
        if self.partial.exists():
            self.partial.unlink()

    def failed(self, total: int) -> str:
        """Close the partial file; one line saying where the finished answers are."""
        self._close()
        if self.to_stdout or self.done == 0:
            return f"stopped after {self.done} of {total} answers; nothing was written"
        return f"stopped after {self.done} of {total} answers; the finished ones are in {self.partial}"

    def _close(self) -> None:
        if self._partial_file is not None:
            self._partial_file.close()
            self._partial_file = None
