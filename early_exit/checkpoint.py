"""Reading and writing heads checkpoints: crash-safe folder saves and validated, consistent loading.

A heads folder holds `config.json` (an `EarlyExitConfig`), `exit_heads.safetensors` (head weights only), a model card
`README.md` and `modeling_early_exit.py` (what `config.json`'s `auto_map` names for `trust_remote_code=True` loads),
plus `base_adapter/` for heads whose base runs with a PEFT adapter: the same files `push_to_hub` uploads. It stays a
plain folder, so `from_pretrained`, `hf upload` and `git` see nothing unusual.

How a save stays whole. The new contents are written to a staging folder beside the target, made durable, then
swapped with the target in one atomic exchange (`renameat2(RENAME_EXCHANGE)` on Linux, `renamex_np(RENAME_SWAP)` on
macOS), and the previous contents, now in the staging folder, are removed. The path therefore always holds a complete
old or new folder: for a crash at any step, for a reader loading while it is saved, and for two writers. Writers
serialise their last step (carrying the folder's other files over, then swapping) on a lock of the parent folder, and
each holds a lock on its staging folder while it lives, so the next save knows leftovers of killed saves
(`.NAME.saving-*`, `.NAME.old-*`) from a live save's folder and removes them. Where the file system cannot exchange,
the old folder is renamed aside and the new one in; if a crash comes between the two, the next save or load puts the
old folder back. A target that is a symlink is saved through: the folder it points to is replaced, the link stays.

How a load stays consistent. Every save records one random `save_id` in both `config.json` and the weights file's
metadata, so a reader that read the config of one save and the weights of the next (a save landed in between) sees it
and reads both again.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError

if TYPE_CHECKING:
    from .configuration_early_exit import EarlyExitConfig

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; saves there fall back to two renames without a lock
    fcntl = None

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "exit_heads.safetensors"
MODEL_CARD_NAME = "README.md"
#: Subfolder of a heads folder holding the PEFT adapter of the base model, when one was trained with the heads.
BASE_ADAPTER_DIR = "base_adapter"
#: The weights file PEFT writes for an adapter.
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
#: The code file a heads folder carries so that the Auto classes load it with `trust_remote_code=True` without
#: `import early_exit` (a copy of `early_exit/remote_code.py`, which takes the classes from the installed package).
REMOTE_CODE_NAME = "modeling_early_exit.py"
#: The `auto_map` a heads folder's `config.json` holds: the Auto classes and where in `REMOTE_CODE_NAME` they are.
AUTO_MAP = {
    auto_class: f"{Path(REMOTE_CODE_NAME).stem}.{name}"
    for auto_class, name in (("AutoConfig", "EarlyExitConfig"), ("AutoModelForCausalLM", "EarlyExitForCausalLM"))
}
_REMOTE_CODE_SOURCE = Path(__file__).with_name("remote_code.py")
#: What a heads save writes. Nothing else in the folder is its own (logs, notes), so a new save carries the rest over,
#: but never these: a `base_adapter/` of an earlier save must not outlive a save without one.
HEADS_FOLDER_FILES = (
    CONFIG_NAME,
    WEIGHTS_NAME,
    MODEL_CARD_NAME,
    BASE_ADAPTER_DIR,
    GENERATION_CONFIG_NAME,
    REMOTE_CODE_NAME,
)
#: The files a tokenizer saved with the heads may write (`save_pretrained(..., tokenizer=...)`).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
#: The weights file's metadata key (and config field) naming the save that wrote it.
SAVE_ID_KEY = "save_id"
#: How often a load reads a config and weights again when a concurrent save keeps landing between the two reads.
_CONSISTENT_READ_ATTEMPTS = 5
_STAGING = "saving"
_RETIRED = "old"


def write_remote_code(folder: str | os.PathLike) -> None:
    """Write the heads folder's `REMOTE_CODE_NAME` (the file `AUTO_MAP` points the Auto classes at) into `folder`."""
    shutil.copyfile(_REMOTE_CODE_SOURCE, Path(folder) / REMOTE_CODE_NAME)


def new_save_id() -> str:
    """A fresh id for one save, recorded in its config and its weights."""
    return uuid.uuid4().hex


def _save_target(target: str | os.PathLike) -> Path:
    """The folder a save to `target` replaces: its absolute path, through a symlink at `target` itself."""
    path = Path(os.path.abspath(target))
    return path.resolve() if path.is_symlink() else path


def _leftovers(target: Path, kind: str) -> list[Path]:
    """Folders beside `target` that saves to it made: staging (`kind="saving"`) or set aside (`kind="old"`)."""
    prefix = f".{target.name}.{kind}-"
    if not target.parent.is_dir():
        return []
    return [
        entry
        for entry in target.parent.iterdir()
        if entry.name.startswith(prefix) and entry.is_dir() and not entry.is_symlink()
    ]


@contextmanager
def _lock(folder: Path, wait: bool = True) -> Iterator[bool]:
    """Hold an advisory lock on `folder` (`flock`; released by the kernel if the process dies) while the block runs.

    Yields whether the lock is held: always when waiting; without waiting, False if another process holds it.
    Without `fcntl` (Windows) nothing is locked and True is yielded.
    """
    if fcntl is None:
        yield True
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(descriptor)


def _make_exchange() -> Callable[[bytes, bytes], int] | None:
    """The C call that swaps two paths atomically, or None where the platform has none."""
    if os.name != "posix":
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        renameat2 = libc.renameat2
        renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        at_fdcwd, rename_exchange = -100, 2  # <fcntl.h>, <linux/fs.h>
        return lambda first, second: renameat2(at_fdcwd, first, at_fdcwd, second, rename_exchange)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        renamex_np = libc.renamex_np
        renamex_np.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        rename_swap = 2  # <stdio.h>
        return lambda first, second: renamex_np(first, second, rename_swap)
    return None


_EXCHANGE = _make_exchange()


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the platform or file system cannot."""
    if _EXCHANGE is None:
        return False
    if _EXCHANGE(os.fsencode(first), os.fsencode(second)) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _fsync_folder(folder: Path) -> None:
    """Make a folder's entries (new names, renames) durable; a no-op where folders cannot be opened (Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _make_durable(staging: Path) -> None:
    """Give every file the permissions of an ordinary saved file and flush files and folders to disk."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the saved folder should look like any other
    for folder, _, files in os.walk(staging):
        for name in files:
            path = os.path.join(folder, name)
            os.chmod(path, 0o666 & ~umask)  # some writers create private files; saved heads are for sharing
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_folder(Path(folder))


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _carry_over(target: Path, staging: Path, owned: Collection[str]) -> None:
    """Bring the files of `target` that are not the save's own into `staging` (hard links: nothing large is copied)."""
    if not target.is_dir():
        return
    for item in target.iterdir():
        if item.name in owned or os.path.lexists(staging / item.name):
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.copytree(item, staging / item.name, copy_function=_link_or_copy, symlinks=True)
        elif item.is_symlink():
            os.symlink(os.readlink(item), staging / item.name)
        else:
            _link_or_copy(str(item), str(staging / item.name))


def _restore_set_aside(target: Path) -> bool:
    """If `target` is missing and a save killed between its two renames set the previous folder aside, move it back
    (the latest, if several). Call with the parent's lock held. Returns whether a folder was restored."""
    if os.path.lexists(target):
        return False
    set_aside = [entry / target.name for entry in _leftovers(target, _RETIRED) if (entry / target.name).is_dir()]
    if not set_aside:
        return False
    latest = max(set_aside, key=lambda folder: folder.stat().st_mtime)
    os.rename(latest, target)
    return True


def _tidy(target: Path) -> None:
    """Recover from a killed save, then remove what killed saves left beside `target`. Call with the parent's lock
    held: a live save's staging folder is then always locked by its save, so only dead saves' folders are removed."""
    _restore_set_aside(target)
    for leftover in _leftovers(target, _STAGING) + _leftovers(target, _RETIRED):
        try:
            with _lock(leftover, wait=False) as abandoned:
                if abandoned:
                    shutil.rmtree(leftover, ignore_errors=True)
        except FileNotFoundError:  # another save removed it first
            continue


def recover_interrupted_save(target: str | os.PathLike) -> bool:
    """Put back the previous heads folder if a save was killed while `target` was missing (only possible where the
    file system cannot exchange two folders, or with saves by earlier versions of early-exit). Returns whether it did.

    Raises:
        CheckpointError: the folder set aside cannot be moved back (e.g. the parent folder is read-only); the message
            says where it is.
    """
    target = _save_target(target)
    if os.path.lexists(target) or not _leftovers(target, _RETIRED):
        return False
    try:
        with _lock(target.parent):
            return _restore_set_aside(target)
    except OSError as error:
        raise CheckpointError(
            f"{target} is missing: a save was interrupted and the previous heads are in a "
            f".{target.name}.{_RETIRED}-* folder beside it, which could not be moved back ({error}). Move "
            f".{target.name}.{_RETIRED}-*/{target.name} to {target} yourself."
        ) from error


def _publish(staging: Path, target: Path) -> None:
    """Make `staging` the folder at `target` in one atomic step where possible. Call with the parent's lock held.

    Afterwards `staging` holds the previous contents (after an exchange) or nothing."""
    try:
        os.rename(staging, target)  # no folder there yet (or an empty one): one rename is atomic
    except OSError as error:
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        if not _exchange(staging, target):
            # Two renames: a crash between them leaves the old folder set aside, where _tidy finds it again.
            set_aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_RETIRED}-", dir=target.parent))
            os.rename(target, set_aside / target.name)
            try:
                os.rename(staging, target)
            except BaseException:
                os.rename(set_aside / target.name, target)
                raise
            finally:
                shutil.rmtree(set_aside, ignore_errors=True)
    _fsync_folder(target.parent)


def _unwritable(target: Path, error: OSError) -> CheckpointError:
    return CheckpointError(
        f"Cannot save to {target}: {error.strerror or error}. Choose a folder you can write to (or fix the "
        "permissions of its parent folder)."
    )


def _refuse_a_file(target: Path) -> None:
    """Raise `CheckpointError` if `target` is a file, or cannot even be looked at."""
    try:
        is_file = target.exists() and not target.is_dir()
    except OSError as error:
        raise _unwritable(target, error) from error
    if is_file:
        raise CheckpointError(f"Cannot save to {target}: it is a file, not a folder. Choose a folder path.")


def check_writable(target: str | os.PathLike) -> None:
    """Check now, before long work, that a save to `target` can succeed: it is not a file, and the folder it goes in
    (or the nearest one that exists) can be written. Creates nothing.

    Raises:
        CheckpointError: what is wrong, and what to do.
    """
    target = _save_target(target)
    _refuse_a_file(target)
    existing = target.parent
    try:
        while not existing.exists():
            existing = existing.parent
        if existing.is_dir():
            os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.{_STAGING}-", dir=existing))
    except OSError as error:
        raise _unwritable(target, error) from error
    if not existing.is_dir():
        raise CheckpointError(f"Cannot save to {target}: {existing} is a file, not a folder. Choose another path.")


@contextmanager
def atomic_directory(target: str | os.PathLike, owned: Collection[str] = ()) -> Iterator[Path]:
    """Build a folder's new contents in a staging folder, then swap it into place (see the module's docstring).

    Yields the staging folder to write into. On success, the entries of the old folder that the new save neither
    wrote nor `owned` are carried over, and the staging folder takes `target`'s place atomically. On any failure the
    staging folder is removed and `target` is left exactly as it was.

    Raises:
        CheckpointError: `target` is a file, or its folder cannot be written.
    """
    target = _save_target(target)
    _refuse_a_file(target)
    with ExitStack() as stack:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with _lock(target.parent):
                _tidy(target)
                staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_STAGING}-", dir=target.parent))
                stack.enter_context(_lock(staging))  # held until the end: this save is alive
        except OSError as error:
            raise _unwritable(target, error) from error
        try:
            yield staging
            _make_durable(staging)
            with _lock(target.parent):
                _carry_over(target, staging, owned)
                _publish(staging, target)
        finally:
            # A failed save's own folder, or after an exchange, the previous contents.
            shutil.rmtree(staging, ignore_errors=True)


def _read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file, from one version of it even while saves replace it."""
    try:
        with open(path, "rb") as pinned:
            # safetensors opens the file by name more than once (the header, then the tensors' storage), and a save
            # may land in between; the name of the file already open here always means this version.
            name = f"/dev/fd/{pinned.fileno()}" if os.path.isdir("/dev/fd") else str(path)
            with safe_open(name, framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"Could not read the head weights in {path}: {error}. The checkpoint is corrupt or was only partly "
            "written; save the heads again (or download them again)."
        ) from error


def read_head_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a heads safetensors file, turning any I/O or format failure into a `CheckpointError`."""
    return _read_safetensors(path)[0]


def read_matching_weights(
    weights_file: str | os.PathLike,
    config: EarlyExitConfig | None,
    read_config: Callable[[], EarlyExitConfig],
    source: str,
) -> tuple[EarlyExitConfig, dict[str, torch.Tensor]]:
    """The config and head weights of one save: `config` if given (else `read_config()`) and the weights in
    `weights_file`, both read again while their save ids differ (a save landed between the two reads).

    A config or weights without a save id (written before save ids, or built by hand) are taken as they are.

    Raises:
        CheckpointError: the weights are unreadable, or saves kept landing between the reads.
    """
    for _ in range(_CONSISTENT_READ_ATTEMPTS):
        config = config if config is not None else read_config()
        weights, metadata = _read_safetensors(weights_file)
        saved_with = metadata.get(SAVE_ID_KEY)
        if saved_with is None or config.save_id is None or saved_with == config.save_id:
            return config, weights
        config = None
    raise CheckpointError(
        f"The heads in {source} were saved again during every one of {_CONSISTENT_READ_ATTEMPTS} attempts to read "
        "their config and weights together; load them when the saves have finished."
    )


def check_inside(folder: str | os.PathLike, relative: str, field: str) -> None:
    """Raise `CheckpointError` unless `folder/relative`, symlinks followed, stays inside `folder` (a config must
    not point a loader at files elsewhere)."""
    root = Path(folder).resolve()
    if not (root / relative).resolve().is_relative_to(root):
        raise CheckpointError(
            f"{field}={relative!r} in {Path(folder) / CONFIG_NAME} leads outside the heads folder; it must name a "
            "subfolder of it (save the heads again)."
        )


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
