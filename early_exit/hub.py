"""Sharing heads on the Hugging Face Hub."""

from __future__ import annotations

import os

from huggingface_hub import HfApi

from .checkpoint import BASE_ADAPTER_DIR, MODEL_CARD_NAME, WEIGHTS_NAME
from .errors import HubUnreachableError

#: The files of a heads folder that are uploaded (with the base's jointly trained PEFT adapter, if there is one);
#: anything else in the folder (logs, notes, trainer checkpoints) stays local.
HEAD_FILES = ["config.json", WEIGHTS_NAME, MODEL_CARD_NAME, f"{BASE_ADAPTER_DIR}/*"]


def _is_network_failure(error: BaseException) -> bool:
    # huggingface_hub raises ConnectionError subclasses in offline mode and its HTTP client's transport errors
    # (connection refused, name not resolved, timeouts) otherwise; the latter are not importable in a stable way.
    return isinstance(error, ConnectionError) or any(cls.__name__ == "TransportError" for cls in type(error).__mro__)


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
    """Create `repo_id` if needed and upload a saved heads folder's config, weights and model card to it.

    Returns:
        The URL of the commit.

    Raises:
        HubUnreachableError: the Hub cannot be reached; the message says how to push later.
    """
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            allow_patterns=HEAD_FILES,
            revision=revision,
            commit_message=commit_message or "Upload early-exit heads",
            create_pr=create_pr,
        )
    except Exception as error:
        if not _is_network_failure(error):
            raise
        raise HubUnreachableError(
            f"Could not push the heads to {repo_id}: the Hugging Face Hub is not reachable ({error}). Push a "
            "folder written by save_pretrained later, from a machine with network access "
            f"(e.g. `hf upload {repo_id} <folder>`)."
        ) from error
    return commit.commit_url
