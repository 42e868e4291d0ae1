"""Sharing heads on the Hugging Face Hub."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import HfApi

from .checkpoint import (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    MODEL_CARD_NAME,
    REMOTE_CODE_NAME,
    TOKENIZER_FILES,
    WEIGHTS_NAME,
)
from .errors import CheckpointError, HubUnreachableError

#: The files of a heads folder that are uploaded (those present), with the base's PEFT adapter when the config names
#: one; anything else in the folder (logs, notes, trainer checkpoints) stays local.
HEAD_FILES = [CONFIG_NAME, WEIGHTS_NAME, MODEL_CARD_NAME, GENERATION_CONFIG_NAME, REMOTE_CODE_NAME, *TOKENIZER_FILES]


def _files_to_upload(folder: str | os.PathLike) -> list[str]:
    """`HEAD_FILES`, and the base adapter's subfolder if the folder's config names one (a folder left by another
    save may hold one its config does not use)."""
    try:
        base_adapter = json.loads((Path(folder) / CONFIG_NAME).read_text(encoding="utf-8")).get("base_adapter")
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"Cannot push {folder}: its {CONFIG_NAME} is missing or unreadable ({error}); save the heads there first."
        ) from error
    return HEAD_FILES + ([f"{base_adapter}/*"] if base_adapter else [])


def _is_network_failure(error: BaseException) -> bool:
    # huggingface_hub raises ConnectionError subclasses in offline mode and its HTTP client's transport errors
    # (connection refused, name not resolved, timeouts) otherwise; the latter are not importable in a stable way.
    return isinstance(error, ConnectionError) or any(cls.__name__ == "TransportError" for cls in type(error).__mro__)


@contextmanager
def explain_unreachable_hub(repo_id: str) -> Iterator[None]:
    """Turn a failure to reach the Hub inside the block, while pushing heads to `repo_id`, into a
    `HubUnreachableError` that says how to push later; any other error passes unchanged.

    Raises:
        HubUnreachableError: the Hub cannot be reached (no network, or offline mode).
    """
    try:
        yield
    except Exception as error:
        if not _is_network_failure(error):
            raise
        raise HubUnreachableError(
            f"Could not push the heads to {repo_id}: the Hugging Face Hub is not reachable ({error}). Push a "
            "folder written by save_pretrained later, from a machine with network access "
            f"(e.g. `hf upload {repo_id} <folder>`)."
        ) from error


def upload_heads(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> str:
    """Create `repo_id` if needed and upload a saved heads folder's files (`HEAD_FILES`) to it.

    Returns:
        The URL of the commit.

    Raises:
        CheckpointError: the folder has no readable config.json.
        HubUnreachableError: the Hub cannot be reached; the message says how to push later.
    """
    files = _files_to_upload(folder)
    api = HfApi(token=token)
    with explain_unreachable_hub(repo_id):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            allow_patterns=files,
            revision=revision,
            commit_message=commit_message or "Upload early-exit heads",
            create_pr=create_pr,
        )
    return commit.commit_url
