"""Text for training and calibrating exits: local files, `datasets` files, the Python library, model generations.

No labels are needed (the targets are the model's own final-layer distributions), so any text works. Every source
is split the same way into `train`, `calibration` and `eval`, so text used to calibrate or evaluate heads is never
text they were trained on.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .prompts import format_prompt, load_prompts

SPLITS = ("train", "calibration", "eval")
#: Share of each source that goes to each split (hashing names, so the split of a file never changes).
SPLIT_SHARES = {"train": 0.8, "calibration": 0.1, "eval": 0.1}
#: File suffixes read with a `datasets` loader (the others are read as plain text).
DATASETS_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def split_of(name: str) -> str:
    """The split (`train`, `calibration` or `eval`) that the item called `name` belongs to: stable across runs."""
    position = int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:8], 16) / 16**8
    for split in SPLITS:
        position -= SPLIT_SHARES[split]
        if position < 0:
            return split
    return SPLITS[-1]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {SPLITS}.")


@cache
def _library_modules(installed_packages: bool) -> tuple[tuple[Path, str], ...]:
    """(root, name) of every module of the standard library, and of the installed packages if asked, tests left out,
    in an order fixed by hashing the names (not alphabetical), so any prefix is a mix of the whole library. Walked
    once per process: each split and kind reads the same list."""
    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"])]
    if installed_packages:
        roots += sorted({Path(paths["purelib"]), Path(paths["platlib"])})
    skipped = ("site-packages", "dist-packages", "test/", "tests/", "idlelib/test")
    modules = [
        (root, name)
        for root in roots
        for name in (str(path.relative_to(root)) for path in root.rglob("*.py"))
        if not name.startswith(skipped) and "/tests/" not in name
    ]
    return tuple(sorted(modules, key=lambda module: hashlib.sha256(module[1].encode("utf-8")).hexdigest()))


def python_library_texts(split: str, kind: str = "docstrings", installed_packages: bool = False) -> Iterator[str]:
    """Text from the Python standard library of this interpreter, which every machine has.

    Args:
        split: which split's modules to read; modules are assigned to splits by their path.
        kind: "docstrings" (the prose of module, class and function docstrings, one text per module) or "source"
            (whole module files).
        installed_packages: read the installed packages (site-packages) too, mixed with the standard library. They
            hold several times its text, but what they hold depends on what is installed. A docstring met before
            (libraries copy them between modules) is skipped.

    Yields texts in an order fixed by hashing (not alphabetical), so any prefix is a mix of the whole library.
    """
    _check_split(split)
    if kind not in ("docstrings", "source"):
        raise ValueError(f"kind must be 'docstrings' or 'source', got {kind!r}.")
    seen: set[str] = set()
    for root, name in _library_modules(installed_packages):
        if split_of(name) != split:
            continue
        try:
            source = (root / name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if kind == "source":
            yield source
            continue
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        nodes = [tree, *(node for node in ast.walk(tree) if isinstance(node, ast.ClassDef | ast.FunctionDef))]
        docstrings = [doc for doc in (ast.get_docstring(node) for node in nodes) if doc and len(doc) > 40]
        docstrings = [doc for doc in docstrings if doc not in seen]
        seen.update(docstrings)
        if docstrings:
            yield "\n\n".join(docstrings)


def file_texts(paths: Iterable[str | os.PathLike], column: str = "text") -> Iterator[str]:
    """Texts from users' files: plain text files whole, and `.json`/`.jsonl`/`.csv`/`.parquet` through the
    `datasets` loader of that format, one text per row of `column`.

    Raises:
        FileNotFoundError: a path does not exist.
        KeyError: a data file has no column named `column`.
    """
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"Training text {path} does not exist.")
        loader = DATASETS_LOADERS.get(path.suffix.lower())
        if loader is None:
            yield path.read_text(encoding="utf-8", errors="replace")
            continue
        import datasets

        rows = datasets.load_dataset(loader, data_files=str(path), split="train")
        if column not in rows.column_names:
            raise KeyError(f"{path} has no column {column!r} (it has {rows.column_names}); pass column=<name>.")
        yield from rows[column]


@torch.no_grad()
def generate_sequences(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    split: str,
    max_new_tokens: int = 96,
    batch_size: int = 8,
    do_sample: bool = True,
    temperature: float = 0.7,
    seed: int = 0,
) -> list[list[int]]:
    """The model's own continuations of the project's prompts of `split` (chat template for instructions).

    Returns one token-id list per prompt: the formatted prompt followed by what the model generated, without
    padding. Sampling (by default, seeded) gives more varied text than greedy decoding's repetitions.
    """
    _check_split(split)
    prompts = [format_prompt(prompt, tokenizer) for prompt in load_prompts(split)]
    saved = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    sequences = []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=f"generating ({split} prompts)", disable=None):
            batch = tokenizer(
                prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(model.device)
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
            )
            width = batch["input_ids"].shape[1]
            for row, mask in zip(output.tolist(), batch["attention_mask"].tolist()):
                completion = row[width:]
                if tokenizer.pad_token_id in completion:  # finished early: the rest is padding
                    completion = completion[: completion.index(tokenizer.pad_token_id)]
                sequences.append([token for token, keep in zip(row[:width], mask) if keep] + completion)
    finally:
        tokenizer.padding_side, tokenizer.pad_token = saved
        torch.random.set_rng_state(generator_state)
    return sequences


def tokenize_texts(
    texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, max_tokens: int | None = None
) -> Iterator[list[int]]:
    """Token ids of each text, stopping once `max_tokens` tokens have been produced in all."""
    produced = 0
    for text in texts:
        if max_tokens is not None and produced >= max_tokens:
            return
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if max_tokens is not None:
            ids = ids[: max_tokens - produced]
        produced += len(ids)
        if ids:
            yield ids


@dataclass
class TokenBlocks(Dataset):
    """Token sequences packed into blocks of equal length: the inputs of distillation training.

    Each item is `{"input_ids", "attention_mask"}`. Packing joins documents with a separator token so no
    position is wasted on padding; only the last block may be shorter.
    """

    blocks: list[list[int]]

    @classmethod
    def pack(cls, sequences: Iterable[list[int]], block_size: int, separator_id: int | None) -> TokenBlocks:
        """Concatenate `sequences` (with `separator_id` between them, if given) and cut into `block_size` blocks."""
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}.")
        stream: list[int] = []
        for sequence in sequences:
            if stream and separator_id is not None:
                stream.append(separator_id)
            stream.extend(sequence)
        blocks = [stream[start : start + block_size] for start in range(0, len(stream), block_size)]
        return cls([block for block in blocks if len(block) >= 2])

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor(self.blocks[index], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    @property
    def num_tokens(self) -> int:
        """Tokens in all blocks together."""
        return sum(len(block) for block in self.blocks)


def distillation_corpus(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    split: str,
    max_tokens: int,
    block_size: int = 512,
    generation_tokens: int = 96,
    files: Iterable[str | os.PathLike] = (),
    source_share: float = 0.3,
    installed_packages: bool = False,
    skip_tokens: int = 0,
) -> TokenBlocks:
    """The project's default mix of text for one split, packed into blocks.

    It holds the model's own generations for the split's prompts (so heads see what decoding feeds them; skipped
    when `generation_tokens` is 0), then users' `files` if given, else the Python library's docstrings and, for
    `source_share` of the remaining budget, its source code, up to `max_tokens` tokens in all. Source code fills
    what the docstrings cannot (the standard library's training split holds about 0.4M tokens of docstrings and
    3.3M of source, in SmolLM2's tokens); `installed_packages` reads the installed packages too (see
    `python_library_texts`).

    `skip_tokens` leaves out the text that the corpus of `skip_tokens` tokens (the other arguments the same) holds,
    so that heads trained on that one can go on with text they have not seen: the two together hold what the
    corpus of `skip_tokens + max_tokens` tokens holds, with the same mix of docstrings and source.
    """
    if skip_tokens < 0:
        raise ValueError(f"skip_tokens must be at least 0, got {skip_tokens}.")
    generations = generate_sequences(model, tokenizer, split, generation_tokens) if generation_tokens else []
    # The generations come first whatever the budget, so any earlier corpus held them all.
    sequences = [] if skip_tokens else generations
    skipped, remaining = (
        max(0, budget - sum(map(len, generations))) for budget in (skip_tokens, skip_tokens + max_tokens)
    )
    files = list(files)
    if files:
        sequences += _drop_tokens(tokenize_texts(file_texts(files), tokenizer, remaining), skipped)
    else:
        library = partial(python_library_texts, split, installed_packages=installed_packages)
        docstrings = list(tokenize_texts(library("docstrings"), tokenizer, remaining - int(remaining * source_share)))
        source = tokenize_texts(library("source"), tokenizer, remaining - sum(map(len, docstrings)))
        # The earlier corpus's docstrings are a prefix of these (its budget for them was smaller); its source
        # filled the rest of its budget.
        skipped_docstrings = min(skipped - int(skipped * source_share), sum(map(len, docstrings)))
        sequences += _drop_tokens(docstrings, skipped_docstrings)
        sequences += _drop_tokens(source, skipped - skipped_docstrings)
    return TokenBlocks.pack(sequences, block_size, tokenizer.eos_token_id)


def _drop_tokens(sequences: Iterable[list[int]], count: int) -> list[list[int]]:
    """`sequences` without their first `count` tokens (a sequence cut in the middle keeps its tail)."""
    kept = []
    for sequence in sequences:
        if count >= len(sequence):
            count -= len(sequence)
            continue
        kept.append(sequence[count:])
        count = 0
    return kept
