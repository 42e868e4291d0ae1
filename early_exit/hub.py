"""Sharing heads on the Hugging Face Hub."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from .errors import EarlyExitError


class HubUnreachableError(EarlyExitError, ConnectionError):
    """The Hub could not be reached (no network, or offline mode)."""


def _is_network_failure(error: BaseException) -> bool:
    # huggingface_hub raises ConnectionError subclasses in offline mode and its HTTP client's transport errors
    # (connection refused, name not resolved, timeouts) otherwise; neither family is importable in a stable way.
    return isinstance(error, ConnectionError) or any(
        cls.__name__ == "TransportError" for cls in type(error).__mro__
    )


@contextmanager
def reaching_the_hub(action: str, local_folder: str | None = None) -> Iterator[None]:
    """Turn a failure to reach the Hub during `action` into a `HubUnreachableError` that says what to do."""
    try:
        yield
    except Exception as error:
        if not _is_network_failure(error):
            raise
        kept = f" The heads were saved locally in {local_folder}." if local_folder else ""
        raise HubUnreachableError(
            f"Could not {action}: the Hugging Face Hub is not reachable ({error}).{kept} Save them with "
            "save_pretrained(folder) and push the folder later from a machine with network access "
            "(e.g. `hf upload <repo_id> <folder>`)."
        ) from error
