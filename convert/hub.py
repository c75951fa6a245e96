"""Fetch a Hugging Face repo (safetensors, configs, tokenizer, chat template only)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from mlx_llama.errors import MlxLlamaError

# Only what a conversion reads; never pickles, never code.
ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "*.jinja"]
# Meta's repos keep their own (pickle) format under original/.
IGNORE_PATTERNS = ["original/*"]

def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def download(repo_id: str, revision: str | None = None, log: Callable[[str], None] = print) -> Path:
    """The local snapshot directory of `repo_id`, downloading what is missing (with progress)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf

    offline = _offline()
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    log(f"fetching {where} from the Hugging Face {'cache (offline)' if offline else 'hub'}")
    login = "accept its license on https://huggingface.co/{} and log in with `huggingface-cli login` (or set HF_TOKEN)"
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=ALLOW_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
            # Read at call time, so a cache/offline setting made after import still counts.
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            local_files_only=offline,
        )
    except hf.GatedRepoError:
        raise MlxLlamaError(f"{repo_id} is gated: {login.format(repo_id)}") from None
    except hf.RevisionNotFoundError:
        raise MlxLlamaError(f"revision {revision!r} not found in {repo_id}") from None
    except hf.RepositoryNotFoundError:
        raise MlxLlamaError(
            f"{repo_id} not found on the Hugging Face hub (check the name; if it is private, "
            "log in with `huggingface-cli login` or set HF_TOKEN)"
        ) from None
    except (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled):
        hint = ("it is not in the local Hugging Face cache; unset HF_HUB_OFFLINE and connect to download it"
                if offline else "the hub cannot be reached and it is not cached; check your network")
        raise MlxLlamaError(f"cannot fetch {where}: {hint}") from None
    except hf.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise MlxLlamaError(f"access to {repo_id} denied: {login.format(repo_id)}") from None
        raise MlxLlamaError(f"cannot fetch {where}: {str(e).splitlines()[0]}") from None
    except OSError as e:  # network errors surface as OSError subclasses (httpx, ssl, socket)
        raise MlxLlamaError(f"cannot fetch {where}: {e}; check your network or use HF_HUB_OFFLINE=1") from None
    except Exception as e:  # httpx transport errors are not OSErrors
        if type(e).__module__.startswith(("httpx", "httpcore", "requests", "urllib3")):
            raise MlxLlamaError(
                f"cannot fetch {where}: network error ({type(e).__name__}); check your network "
                "or use HF_HUB_OFFLINE=1 with a cached copy"
            ) from None
        raise
    return Path(path)
