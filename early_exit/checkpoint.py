"""Reading and writing heads checkpoints: atomic directory writes and validated weight loading.

A heads folder holds `config.json` (an `EarlyExitConfig`), `exit_heads.safetensors` (head weights only) and a short
model card `README.md`: the same files `push_to_hub` uploads.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import CheckpointError

WEIGHTS_NAME = "exit_heads.safetensors"
MODEL_CARD_NAME = "README.md"
#: Subfolder of a heads folder holding the PEFT adapter of the base model, when one was trained with the heads.
BASE_ADAPTER_DIR = "base_adapter"
#: The weights file PEFT writes for an adapter.
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Build a directory's new contents in a staging folder, then swap it into place.

    Yields the staging folder to write into. On success, files already in `target` that the new save does not
    replace are carried over (hard-linked, so nothing large is copied) and the staging folder takes `target`'s place
    with two renames. On any failure the staging folder is removed and `target` is left exactly as it was.
    """
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"Cannot save into {target}: it is a file, not a directory.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the saved folder should look like any other
    try:
        yield staging
        for written in staging.rglob("*"):
            if written.is_file():
                os.chmod(written, 0o666 & ~umask)  # some writers create private files; saved heads are for sharing
                with open(written, "rb") as handle:
                    os.fsync(handle.fileno())
        if not target.exists():
            os.replace(staging, target)
            return
        for item in target.iterdir():
            if not (staging / item.name).exists():
                if item.is_dir():
                    shutil.copytree(item, staging / item.name, copy_function=_link_or_copy, symlinks=True)
                else:
                    _link_or_copy(str(item), str(staging / item.name))
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, retired / target.name)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_head_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a heads safetensors file, turning any I/O or format failure into a `CheckpointError`."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"Could not read the head weights in {path}: {error}. The checkpoint is corrupt or was only partly "
            "written; save the heads again (or download them again)."
        ) from error


def check_head_weights(expected: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], source: str) -> None:
    """Raise `CheckpointError` naming every missing, unexpected or mis-shaped tensor in `loaded`."""
    problems = []
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    for name in sorted(set(expected) & set(loaded)):
        if expected[name].shape != loaded[name].shape:
            problems.append(
                f"{name} has shape {tuple(loaded[name].shape)} where the heads need {tuple(expected[name].shape)}"
            )
    if problems:
        raise CheckpointError(
            f"The head weights in {source} do not match their config: {'; '.join(problems)}. The checkpoint is "
            "partial or its config.json belongs to other heads; save the heads again."
        )


def model_card(
    base_model: str | None,
    exit_layers: list[int],
    num_layers: int,
    head_type: str,
    head_parameters: int,
    base_parameters: int,
    training: dict | None = None,
) -> str:
    """A short Hub model card for a heads folder; `training` (the config's record of how the heads were trained)
    becomes a section of its own."""
    share = 100.0 * head_parameters / base_parameters
    front_matter = ["---", "library_name: early-exit", "tags:", "- early-exit"]
    if base_model:
        front_matter.append(f"base_model: {base_model}")
    front_matter.append("---")
    base = base_model or "(not recorded: pass `base_model=` when loading)"
    return "\n".join(
        front_matter
        + [
            "",
            f"# Early-exit heads for {base}",
            "",
            f"{len(exit_layers)} `{head_type}` exit heads after layers {exit_layers} of {num_layers}: "
            f"{head_parameters:,} parameters, {share:.2f}% of the base model's {base_parameters:,}. "
            "Only the heads are stored here; the base model is loaded from the id above.",
            "",
            "```python",
            "import early_exit  # registers the early_exit model type",
            "from transformers import AutoModelForCausalLM",
            "",
            'model = AutoModelForCausalLM.from_pretrained("<this folder or repo>")',
            "```",
            "",
        ]
        + (["## Training", "", *(f"- {key}: {value}" for key, value in training.items()), ""] if training else [])
    )
