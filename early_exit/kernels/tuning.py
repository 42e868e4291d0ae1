"""Which matmul form is fastest for a weight shape and row count on this machine: timed once, then kept.

No rule holds across CPUs (see `early_exit.kernels.forms`), so `tune_forms` times every candidate form on the
weights themselves, all the weights of one shape in turn so that they stream from memory as in a pass of the model,
for each bucket of row counts (`ROW_BUCKETS`), interleaved in a new shuffled order each round; each form keeps its
best round. `F.linear` stays unless another form is clearly faster. The result is kept for the process and in
`$EARLY_EXIT_CACHE/matmul-forms.json` (default `~/.cache/early-exit`) under a signature of the machine (CPU model,
core count, torch version) and the thread count, so that later processes on the machine skip the timing (a few
seconds for SmolLM2-135M); delete the file to time again.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from transformers.utils import logging

from ..cache import cache_root
from .forms import PACKINGS, LinearForm, apply_form, can_pack, has_forms, pack_weight
from .panels import native_panels

logger = logging.get_logger(__name__)

#: The row counts timed; a product of `rows` rows takes the choice of the first bucket at least `rows` (above the
#: last, the last's). Decoding runs 1-16 rows a pass; 128 stands for prompts.
ROW_BUCKETS = (1, 2, 3, 4, 8, 16, 128)

#: The buckets that choose a weight's one packed copy: the row counts of the decoding loop's passes. On the default
#: model every product of a decoding pass has 1 row (early exit) or 1 and 4 (self-speculative decoding with prompt
#: lookup), prompts apart, and a verification of all `max_draft_tokens` (8) drafts has 9; the panels kernel wins at
#: 1-8 rows and loses to oneDNN's packing at 16, so weighing every bucket alike could give decoding the slower copy.
#: The other buckets take the fastest form given the chosen copy.
PACKING_BUCKETS = (1, 2, 3, 4, 8)

#: Timed rounds (after one that warms up: oneDNN generates its kernels on first use).
ROUNDS = 3
#: Another form replaces `F.linear` only if it is faster by more than this share: ties keep the untouched path.
_MARGIN = 0.03
#: The weights of one shape timed at most (enough to stream from memory, not from a cache); more would only cost time.
_MAX_TIMED_BYTES = 128 * 2**20
#: 2: the panels kernel joined the forms (files of format 1 never timed it).
_FILE_FORMAT = 2

#: (device type, dtype, out_features, in_features, torch threads): what a choice depends on.
ShapeKey = tuple[str, torch.dtype, int, int, int]


@dataclass(frozen=True)
class FormChoice:
    """The fastest form for each of `ROW_BUCKETS`, for one weight shape: with a packed copy of the weight at hand
    (`packed`, which uses at most one of the `PACKINGS`) and without (`unpacked`)."""

    packed: tuple[LinearForm, ...]
    unpacked: tuple[LinearForm, ...]

    def __post_init__(self) -> None:
        # The form of every row count up to the last bucket, looked up per product in the decoding loop.
        for name in ("packed", "unpacked"):
            by_bucket = getattr(self, name)
            by_rows = [LinearForm.STOCK]  # no rows
            for bucket, form in zip(ROW_BUCKETS, by_bucket):
                by_rows += [form] * (bucket + 1 - len(by_rows))
            object.__setattr__(self, f"_{name}_by_rows", tuple(by_rows))

    def form(self, rows: int, packed: bool) -> LinearForm:
        """The form for a product of `rows` rows (`packed`: whether a packed weight is at hand)."""
        by_rows = self._packed_by_rows if packed else self._unpacked_by_rows
        return by_rows[min(rows, ROW_BUCKETS[-1])]

    def only_stock(self, packed: bool) -> bool:
        """Whether every row count runs `F.linear` (`packed`: whether a packed weight is at hand)."""
        return all(form is LinearForm.STOCK for form in (self.packed if packed else self.unpacked))

    @property
    def packing(self) -> LinearForm | None:
        """The packed form that some row count runs fastest (so the copy of the weight to make), or `None`."""
        return next((form for form in self.packed if form in PACKINGS), None)


#: What an untimed shape gets: `F.linear` at every row count.
STOCK_CHOICE = FormChoice((LinearForm.STOCK,) * len(ROW_BUCKETS), (LinearForm.STOCK,) * len(ROW_BUCKETS))

_CHOICES: dict[ShapeKey, FormChoice] = {}
_LOCK = threading.Lock()


def shape_key(weight: torch.Tensor) -> ShapeKey:
    """What the form choice for products with `weight` depends on, with the current thread count."""
    return (weight.device.type, weight.dtype, weight.shape[0], weight.shape[1], torch.get_num_threads())


def choice_for(weight: torch.Tensor) -> FormChoice:
    """The timed choice for `weight`'s shape at the current thread count; `F.linear` everywhere if it was not timed
    (see `tune_forms`)."""
    return _CHOICES.get(shape_key(weight), STOCK_CHOICE)


def tune_forms(weights: Iterable[torch.Tensor], rounds: int = ROUNDS) -> None:
    """Make `choice_for` answer for every shape among `weights` at the current thread count: from this process's
    earlier timings, else from the machine's forms file, else by timing the forms on these weights (and saving the
    result to the file). Weights without forms to choose from (not a plain fp32/bf16 CPU matrix) are skipped."""
    groups: dict[ShapeKey, dict[int, torch.Tensor]] = {}
    for weight in weights:
        if has_forms(weight):
            groups.setdefault(shape_key(weight), {})[weight.data_ptr()] = weight  # tied weights once
    with _LOCK:
        missing = [key for key in groups if key not in _CHOICES]
        if not missing:
            return
        machines = _saved_machines()
        saved = _machine_choices(machines)
        untimed = [key for key in missing if _entry_name(key) not in saved]
        for key in missing:
            if key not in untimed:
                _CHOICES[key] = saved[_entry_name(key)]
        if not untimed:
            return
        logger.warning(
            "Timing the matmul forms of %d weight shape(s) on this CPU (once per machine; kept in %s).",
            len(untimed),
            forms_file(),
        )
        for key in untimed:
            group = list(groups[key].values())
            _CHOICES[key] = saved[_entry_name(key)] = _pick(_time_forms(group, rounds))
        _write_forms_file(machines, saved)


def _candidates(bucket: int, packings: list[LinearForm]) -> list[LinearForm]:
    """The forms worth timing for `bucket` rows, with the packed forms `packings`: doubling the row only means
    something for one row, and `weight @ x.T` of one row is the same product as `F.linear`'s."""
    return [LinearForm.STOCK, LinearForm.DOUBLED_ROW if bucket == 1 else LinearForm.WEIGHT_MAJOR, *packings]


def _time_forms(weights: list[torch.Tensor], rounds: int) -> dict[tuple[int, LinearForm], float]:
    """Best seconds over `rounds` interleaved rounds of each (bucket, candidate form) multiplied through `weights`
    (those that fit `_MAX_TIMED_BYTES`)."""
    timed, size = [], 0
    for weight in weights:
        if timed and size + weight.numel() * weight.element_size() > _MAX_TIMED_BYTES:
            break
        timed.append(weight.detach())
        size += weight.numel() * weight.element_size()
    packings = [packing for packing in PACKINGS if can_pack(timed[0], packing)]
    packed = {packing: [pack_weight(weight, packing) for weight in timed] for packing in packings}
    in_features, dtype = timed[0].shape[1], timed[0].dtype
    inputs = {bucket: torch.randn(bucket, in_features).to(dtype) for bucket in ROW_BUCKETS}
    cases = [(bucket, form) for bucket in ROW_BUCKETS for form in _candidates(bucket, packings)]
    best = dict.fromkeys(cases, math.inf)
    order = random.Random(0)
    with torch.inference_mode():
        for round_ in range(rounds + 1):
            order.shuffle(cases)
            for bucket, form in cases:
                x, copies = inputs[bucket], packed.get(form, [None] * len(timed))
                started = time.perf_counter()
                for weight, copy in zip(timed, copies):
                    apply_form(form, x, weight, None, copy)
                elapsed = time.perf_counter() - started
                if round_:
                    best[bucket, form] = min(best[bucket, form], elapsed)
    return best


def _pick(times: dict[tuple[int, LinearForm], float]) -> FormChoice:
    """The fastest timed form per bucket, without packed weights and with the one packed form that saves the most
    over `PACKING_BUCKETS` (each weighing alike); `F.linear` unless beaten by over `_MARGIN`."""
    plain = {LinearForm.STOCK, LinearForm.DOUBLED_ROW, LinearForm.WEIGHT_MAJOR}

    def fastest(bucket: int, allowed: set[LinearForm]) -> LinearForm:
        winner = min((form for at, form in times if at == bucket and form in allowed), key=lambda f: times[bucket, f])
        return winner if times[bucket, winner] * (1 + _MARGIN) < times[bucket, LinearForm.STOCK] else LinearForm.STOCK

    def cost(forms: tuple[LinearForm, ...]) -> float:
        return sum(
            times[bucket, form] / times[bucket, LinearForm.STOCK]
            for bucket, form in zip(ROW_BUCKETS, forms)
            if bucket in PACKING_BUCKETS
        )

    unpacked = packed = tuple(fastest(bucket, plain) for bucket in ROW_BUCKETS)
    for packing in {form for _, form in times} & set(PACKINGS):
        with_packing = tuple(fastest(bucket, plain | {packing}) for bucket in ROW_BUCKETS)
        if cost(with_packing) < cost(packed):
            packed = with_packing
    return FormChoice(packed, unpacked)


def forms_file() -> Path:
    """The file that keeps the timed choices of the machines this cache folder has seen."""
    return cache_root() / "matmul-forms.json"


@cache
def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as info:
            name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), None)
    except OSError:
        name = None
    return name or platform.processor() or platform.machine() or "unknown CPU"


def machine_signature() -> str:
    """What the timings belong to besides the shape: the CPU model, the cores, torch's version (which fixes the MKL
    and oneDNN it carries), and whether the panels kernel could be built (its form is among the choices only then)."""
    kernel = "with" if native_panels() is not None else "without"
    return f"{cpu_name()}; {os.cpu_count()} cores; torch {torch.__version__}; {kernel} the panels kernel"


def _entry_name(key: ShapeKey) -> str:
    device, dtype, out_features, in_features, threads = key
    return f"{device} {str(dtype).removeprefix('torch.')} {out_features}x{in_features} {threads} threads"


def _saved_machines() -> dict:
    """The forms file's entries by machine signature; none where it is missing, unreadable or of another format."""
    path = forms_file()
    try:
        content = json.loads(path.read_text())
        if content["format"] == _FILE_FORMAT and content["row_buckets"] == list(ROW_BUCKETS):
            return dict(content["machines"])
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("Ignoring the matmul forms file %s (%s): the forms are timed again.", path, error)
    return {}


def _machine_choices(machines: dict) -> dict[str, FormChoice]:
    """This machine's choices among the forms file's `machines`, by `_entry_name`."""
    try:
        return {
            name: FormChoice(tuple(map(LinearForm, entry["packed"])), tuple(map(LinearForm, entry["unpacked"])))
            for name, entry in machines.get(machine_signature(), {}).items()
            if len(entry["packed"]) == len(entry["unpacked"]) == len(ROW_BUCKETS)
        }
    except (ValueError, KeyError, TypeError) as error:
        logger.warning("Ignoring this machine's entries in %s (%s): the forms are timed again.", forms_file(), error)
        return {}


def _write_forms_file(machines: dict, choices: dict[str, FormChoice]) -> None:
    """Save this machine's `choices` beside the other `machines`' entries read from the file, atomically (a temporary
    file renamed over it)."""
    path = forms_file()
    machines = dict(machines)
    machines[machine_signature()] = {
        name: {"packed": [form.value for form in choice.packed], "unpacked": [form.value for form in choice.unpacked]}
        for name, choice in sorted(choices.items())
    }
    content = {"format": _FILE_FORMAT, "row_buckets": list(ROW_BUCKETS), "machines": machines}
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".matmul-forms.", delete=False) as file:
            temporary = file.name
            json.dump(content, file, indent=1)
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        logger.warning("Could not save the matmul forms to %s (%s): the next process times them again.", path, error)
