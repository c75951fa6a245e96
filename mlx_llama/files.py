"""Reading the user's files with one-line errors that say what is wrong (missing, a folder, no permission)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from mlx_llama.errors import MlxLlamaError


def read_error(path: str | Path, e: OSError) -> MlxLlamaError:
    """The one-line error for an OSError raised while reading `path`."""
    if isinstance(e, PermissionError):
        return MlxLlamaError(f"cannot read {path}: permission denied (check the file's and its folders' permissions)")
    if isinstance(e, FileNotFoundError):
        return MlxLlamaError(f"{path} not found")
    if isinstance(e, IsADirectoryError):
        return MlxLlamaError(f"{path} is a folder, expected a file")
    return MlxLlamaError(f"cannot read {path}: {e.strerror or e}")


def read_text(path: str | Path) -> str:
    """The UTF-8 text of a file (an undecodable file is an error too)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise read_error(path, e) from None
    except UnicodeDecodeError as e:
        raise MlxLlamaError(f"{path} is not UTF-8 text: {e}") from None


def check_readable(path: str | Path) -> None:
    """Fail early, with a clear message, for a file or folder this process cannot read.

    Libraries that open files themselves (MLX's safetensors loader, the tokenizer)
    report a refused open without saying why.
    """
    p = Path(path)
    try:
        if p.is_dir():
            os.scandir(p).close()
        else:
            with open(p, "rb"):
                pass
    except OSError as e:
        raise read_error(path, e) from None


@contextlib.contextmanager
def replaced_atomically(path: Path, suffix: str = ".tmp") -> Iterator[str]:
    """A temporary file beside `path` for the block to write; when the block succeeds it is renamed
    over `path` with a normal file's mode (mkstemp makes it 0600), when it fails it is removed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
