"""Training text: splits that never mix, packing that loses nothing, users' files, and the model's generations."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import STORIES260K
from transformers import AutoModelForCausalLM, AutoTokenizer

from early_exit.data import corpus, load_prompts
from early_exit.data.corpus import (
    SPLIT_SHARES,
    SPLITS,
    TokenBlocks,
    file_texts,
    generate_sequences,
    python_library_texts,
    split_of,
    tokenize_texts,
)


def test_every_prompt_belongs_to_one_split_and_splits_share_no_prompt():
    prompts = load_prompts()
    assert {prompt["split"] for prompt in prompts} == set(SPLITS)
    texts = {split: {prompt["text"] for prompt in load_prompts(split)} for split in SPLITS}
    assert sum(map(len, texts.values())) == len(prompts) == len({prompt["text"] for prompt in prompts})
    assert {prompt["kind"] for prompt in load_prompts("train")} == {"instruction", "text"}


def test_split_of_is_stable_and_follows_the_shares():
    names = [f"module_{index}.py" for index in range(4000)]
    counts = Counter(map(split_of, names))
    for split, share in SPLIT_SHARES.items():
        assert counts[split] / len(names) == pytest.approx(share, abs=0.03)
    assert [split_of(name) for name in names[:50]] == [split_of(name) for name in names[:50]]


def test_python_library_splits_hold_different_modules():
    texts = {split: set(itertools.islice(python_library_texts(split, "source"), 15)) for split in ("train", "eval")}
    assert len(texts["train"]) == 15 and len(texts["eval"]) == 15
    assert not texts["train"] & texts["eval"]
    docstrings = list(itertools.islice(python_library_texts("calibration"), 5))
    assert docstrings and all("def " not in text.split("\n")[0] for text in docstrings)
    with pytest.raises(ValueError, match="split"):
        next(python_library_texts("validation"))


@settings(max_examples=50, deadline=None)
@given(
    sequences=st.lists(st.lists(st.integers(0, 50), min_size=0, max_size=30), min_size=1, max_size=8),
    block_size=st.integers(2, 17),
    separator=st.one_of(st.none(), st.just(99)),
)
def test_packing_keeps_every_token_in_order(sequences, block_size, separator):
    blocks = TokenBlocks.pack(sequences, block_size, separator)
    stream = []
    for sequence in sequences:
        if stream and separator is not None:
            stream.append(separator)
        stream.extend(sequence)
    packed = [token for block in blocks.blocks for token in block]
    assert packed == stream[: len(packed)] and len(stream) - len(packed) <= 1  # only a lone last token is dropped
    assert all(len(block) == block_size for block in blocks.blocks[:-1])
    for index in range(len(blocks)):
        item = blocks[index]
        assert item["input_ids"].tolist() == blocks.blocks[index] and item["attention_mask"].all()
    assert blocks.num_tokens == len(packed)


def test_users_files_are_read_whole_or_by_column(tmp_path):
    (tmp_path / "notes.txt").write_text("plain text, read whole\nsecond line", encoding="utf-8")
    rows = [{"text": "first row", "id": 1}, {"text": "second row", "id": 2}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    texts = list(file_texts([tmp_path / "notes.txt", tmp_path / "rows.jsonl"]))
    assert texts == ["plain text, read whole\nsecond line", "first row", "second row"]
    with pytest.raises(KeyError, match="no column 'body'"):
        list(file_texts([tmp_path / "rows.jsonl"], column="body"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        list(file_texts([tmp_path / "missing.txt"]))


def test_tokenizing_stops_at_the_budget():
    tokenizer = AutoTokenizer.from_pretrained(STORIES260K)
    ids = list(tokenize_texts(["Once upon a time there was a cat."] * 10, tokenizer, max_tokens=25))
    assert sum(map(len, ids)) == 25


def test_generations_continue_the_prompts_and_leave_the_tokenizer_as_it_was():
    tokenizer = AutoTokenizer.from_pretrained(STORIES260K)
    model = AutoModelForCausalLM.from_pretrained(STORIES260K).eval()
    state = (tokenizer.padding_side, tokenizer.pad_token)
    sequences = generate_sequences(model, tokenizer, "calibration", max_new_tokens=6, batch_size=5)
    assert (tokenizer.padding_side, tokenizer.pad_token) == state
    assert sequences == generate_sequences(model, tokenizer, "calibration", max_new_tokens=6, batch_size=5)
    prompts = load_prompts("calibration")
    assert len(sequences) == len(prompts)
    for prompt, sequence in zip(prompts, sequences):
        prompt_ids = tokenizer(prompt["text"], add_special_tokens=False)["input_ids"]
        assert sequence[: len(prompt_ids)] == prompt_ids  # no padding kept, whatever the row's length
        assert len(prompt_ids) < len(sequence) <= len(prompt_ids) + 6
    # Greedy generation is the model's own argmax continuation.
    greedy = generate_sequences(model, tokenizer, "calibration", max_new_tokens=3, do_sample=False)[0]
    prompt_ids = tokenizer(prompts[0]["text"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt_ids]), max_new_tokens=3, do_sample=False)[0].tolist()
    assert greedy == expected


def test_source_fills_the_budget_the_docstrings_cannot(monkeypatch):
    """The standard library's training split runs out of docstrings at about 0.4M tokens: the rest of a larger
    budget is source code, so a run gets the tokens it asked for."""
    tokenizer = AutoTokenizer.from_pretrained(STORIES260K)
    library = {"docstrings": ["Once upon a time there was a cat."] * 2, "source": ["def cat():\n    return 1\n"] * 500}
    monkeypatch.setattr(corpus, "python_library_texts", lambda split, kind, installed_packages: iter(library[kind]))
    docstring_tokens = 2 * len(tokenizer(library["docstrings"][0], add_special_tokens=False)["input_ids"])
    for budget in (docstring_tokens + 1, 300, 1000):
        blocks = corpus.distillation_corpus(None, tokenizer, "train", budget, block_size=64, generation_tokens=0)
        text_tokens = sum(token != tokenizer.eos_token_id for block in blocks.blocks for token in block)
        assert budget - 1 <= text_tokens <= budget  # packing drops at most a lone last token


def test_installed_packages_add_modules_and_no_docstring_twice(tmp_path, monkeypatch):
    standard, everything = corpus._library_modules(False), corpus._library_modules(True)
    assert set(standard) < set(everything)
    assert len({root for root, _ in everything}) > len({root for root, _ in standard})
    assert not any("/tests/" in name or name.startswith(("test/", "tests/")) for _, name in everything)

    copied = '"""A docstring that a library copies into every module that needs the same function."""'
    names = [name for name in (f"module_{index}.py" for index in range(40)) if split_of(name) == "train"][:2]
    for index, name in enumerate(names):
        own = f'"""Module {index}: a docstring of its own, long enough to be kept as text."""'
        (tmp_path / name).write_text(f"{own}\n\ndef shared():\n    {copied}\n", encoding="utf-8")
    monkeypatch.setattr(corpus, "_library_modules", lambda installed_packages: [(tmp_path, name) for name in names])
    first, second = python_library_texts("train", "docstrings", installed_packages=True)
    assert first.startswith("Module 0") and copied.strip('"') in first
    assert second.startswith("Module 1") and copied.strip('"') not in second


@settings(max_examples=40, deadline=None)
@given(
    skip=st.integers(1, 400),
    tokens=st.integers(8, 400),  # at least 2 new tokens: packing drops a lone one
    docstrings=st.integers(0, 6),
    use_files=st.booleans(),
)
def test_skipping_a_corpus_continues_it_with_unseen_text(tmp_path_factory, skip, tokens, docstrings, use_files):
    """A corpus that skips the first `skip` tokens' corpus holds exactly what the `skip + tokens` corpus adds to it:
    heads trained on the first go on with text they have not seen, in the same mix."""
    tokenizer = AutoTokenizer.from_pretrained(STORIES260K)
    words = "cat dog sun moon tree fish bird rain".split()
    library = {
        "docstrings": [f"Once upon a time the {word} was happy." for word in words[:docstrings]],
        "source": [f"def {word}():\n    return '{word}'\n" for word in words * 20],
    }
    generations = [[5, 6, 7], [8, 9]]
    files = ()
    if use_files:
        files = [tmp_path_factory.mktemp("text") / "story.txt"]
        files[0].write_text(" ".join(words * 40), encoding="utf-8")

    def text_tokens(skip_tokens: int, max_tokens: int) -> Counter:
        blocks = corpus.distillation_corpus(
            None, tokenizer, "train", max_tokens, 100_000, generation_tokens=2, files=files, skip_tokens=skip_tokens
        )
        return Counter(token for block in blocks.blocks for token in block if token != tokenizer.eos_token_id)

    with pytest.MonkeyPatch.context() as patch:  # not the fixture: hypothesis runs this body many times
        patch.setattr(corpus, "python_library_texts", lambda split, kind, installed_packages: iter(library[kind]))
        patch.setattr(corpus, "generate_sequences", lambda *args: [list(sequence) for sequence in generations])
        first, rest, whole = text_tokens(0, skip), text_tokens(skip, tokens), text_tokens(0, skip + tokens)
    assert first + rest == whole  # nothing lost, nothing twice (the generations stay in the first)
    assert rest.total() == whole.total() - first.total() <= tokens


def test_skip_tokens_must_not_be_negative():
    with pytest.raises(ValueError, match="skip_tokens"):
        corpus.distillation_corpus(None, None, "train", 10, generation_tokens=0, skip_tokens=-1)
