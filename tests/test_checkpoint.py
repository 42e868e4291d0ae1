"""Heads-only checkpoints: round trips through AutoModelForCausalLM, atomic saves, clear errors on bad files."""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import VOCAB, tiny_model
from transformers import AutoModelForCausalLM

import early_exit
from early_exit import CheckpointError, EarlyExitConfig, EarlyExitForCausalLM, HeadMismatchError
from early_exit.checkpoint import WEIGHTS_NAME, read_matching_weights
from early_exit.errors import HubUnreachableError
from early_exit.pruning import VocabPruningConfig


def _saved_base(tmp_path, model_type="llama", **overrides):
    """A tiny base model saved to disk and loaded back, so that its config names a real path."""
    tiny_model(model_type, **overrides).save_pretrained(tmp_path / "base")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()


def _with_trained_looking_heads(model, seed=0):
    """Give every head non-trivial weights, so that a round trip that lost them would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.exit_heads.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def _snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@torch.no_grad()
@pytest.mark.parametrize("head_type", ["residual_adapter", "linear", "logit_lens"])
def test_round_trip_through_auto_model_gives_identical_exit_logits(tmp_path, head_type):
    model = _with_trained_looking_heads(early_exit.add_exit_heads(_saved_base(tmp_path), [1, 3], head_type=head_type))
    input_ids = torch.randint(3, VOCAB, (2, 6))
    expected = model(input_ids)
    model.save_pretrained(tmp_path / "heads")

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "heads")
    assert isinstance(again, EarlyExitForCausalLM)
    assert again.exit_layers == [1, 3] and again.config.head_type == head_type
    output = again(input_ids)
    assert torch.equal(output.logits, expected.logits)
    for got, want in zip(output.exit_logits, expected.exit_logits, strict=True):
        assert torch.equal(got, want)


def test_a_pruning_vocabulary_is_saved_on_one_line_and_loads_back(tmp_path):
    model = early_exit.add_exit_heads(_saved_base(tmp_path), [1, 3])
    vocabulary = torch.randperm(VOCAB)[:60].tolist()
    model.config.vocab_pruning = VocabPruningConfig(top_k=8, vocabulary=vocabulary).to_dict()
    model.config.training = {"note": "[1,\n2]"}  # text that looks like a list stays as written
    model.save_pretrained(tmp_path / "heads")
    text = (tmp_path / "heads" / "config.json").read_text()
    assert len(text.splitlines()) < 40 and f'"vocabulary": {json.dumps(vocabulary)}' in text
    again = EarlyExitForCausalLM.from_pretrained(tmp_path / "heads")
    assert again.config.vocab_pruning["vocabulary"] == vocabulary and again.config.training == {"note": "[1,\n2]"}
    assert again.config.exit_layers == [1, 3]


def test_only_head_weights_are_saved(tmp_path):
    model = early_exit.add_exit_heads(_saved_base(tmp_path), [1, 2, 3])
    model.save_pretrained(tmp_path / "heads")
    assert sorted(path.name for path in (tmp_path / "heads").iterdir()) == sorted(
        ["README.md", WEIGHTS_NAME, "config.json", "generation_config.json", "modeling_early_exit.py"]
    )
    tensors = load_file(tmp_path / "heads" / WEIGHTS_NAME)
    assert all(name.startswith("exit_heads.") for name in tensors)
    assert sum(tensor.numel() for tensor in tensors.values()) == model.head_parameter_count()
    config = json.loads((tmp_path / "heads" / "config.json").read_text())
    assert config["model_type"] == "early_exit"
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    assert (config["base_hidden_size"], config["base_num_hidden_layers"], config["base_vocab_size"]) == (32, 4, VOCAB)
    assert f"a local folder, `{tmp_path / 'base'}`" in (tmp_path / "heads" / "README.md").read_text()
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (tmp_path / "heads").iterdir():  # readable like any other saved file, not private to the saver
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name


def test_a_failed_save_leaves_the_previous_checkpoint_untouched(tmp_path, monkeypatch):
    model = _with_trained_looking_heads(early_exit.add_exit_heads(_saved_base(tmp_path), [2]))
    model.save_pretrained(tmp_path / "heads")
    before = _snapshot(tmp_path / "heads")

    def write_half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x00" * 10)
        raise OSError("disk full")

    monkeypatch.setattr("early_exit.modeling_early_exit.save_file", write_half_then_fail)
    _with_trained_looking_heads(model, seed=1)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "heads")
    assert _snapshot(tmp_path / "heads") == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["base", "heads"]  # no staging folder left behind


def test_saving_again_replaces_the_heads_and_keeps_other_files(tmp_path):
    model = early_exit.add_exit_heads(_saved_base(tmp_path), [2])
    (tmp_path / "heads" / "logs").mkdir(parents=True)
    (tmp_path / "heads" / "logs" / "run.txt").write_text("step 1")
    (tmp_path / "heads" / "notes.txt").write_text("mine")
    model.save_pretrained(tmp_path / "heads")
    _with_trained_looking_heads(model)
    model.save_pretrained(tmp_path / "heads")
    assert (tmp_path / "heads" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "heads" / "logs" / "run.txt").read_text() == "step 1"
    saved = load_file(tmp_path / "heads" / WEIGHTS_NAME)
    assert torch.equal(saved["exit_heads.2.up.weight"], model.exit_heads["2"].up.weight)


def test_a_config_from_another_save_than_the_weights_is_read_again(tmp_path):
    model = _with_trained_looking_heads(early_exit.add_exit_heads(_saved_base(tmp_path), [2]))
    heads = tmp_path / "heads"
    model.save_pretrained(heads)
    stale = EarlyExitConfig.from_pretrained(heads)  # as a reader holds it when a save lands
    model.save_pretrained(heads)
    assert stale.save_id != model.config.save_id
    reads = []

    def read_config():
        reads.append(1)
        return EarlyExitConfig.from_pretrained(heads)

    config, weights = read_matching_weights(heads / WEIGHTS_NAME, stale, read_config, str(heads))
    assert reads == [1] and config.save_id == model.config.save_id
    assert torch.equal(weights["exit_heads.2.up.weight"], model.exit_heads["2"].up.weight)
    # The same stale config again and again: saves keep landing, and the load says so instead of mixing them.
    with pytest.raises(CheckpointError, match="saved again during every one of 5 attempts"):
        read_matching_weights(heads / WEIGHTS_NAME, stale, lambda: stale, str(heads))
    assert EarlyExitForCausalLM.from_pretrained(heads, config=stale).config.save_id == model.config.save_id


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_corrupt_weights_file_is_reported(tmp_path, damage):
    model = early_exit.add_exit_heads(_saved_base(tmp_path), [2])
    model.save_pretrained(tmp_path / "heads")
    weights = tmp_path / "heads" / WEIGHTS_NAME
    content = weights.read_bytes()
    weights.write_bytes(
        {"truncate": content[: len(content) // 2], "garbage": b"not safetensors" * 10, "empty": b""}[damage]
    )
    with pytest.raises(CheckpointError, match="corrupt"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "heads")


def test_a_missing_weights_file_is_reported_as_partial(tmp_path):
    early_exit.add_exit_heads(_saved_base(tmp_path), [2]).save_pretrained(tmp_path / "heads")
    (tmp_path / "heads" / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match="partial"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "heads")


def test_weights_that_do_not_match_the_config_are_named(tmp_path):
    early_exit.add_exit_heads(_saved_base(tmp_path), [2], adapter_size=8).save_pretrained(tmp_path / "heads")
    config_path = tmp_path / "heads" / "config.json"
    config = json.loads(config_path.read_text())
    config["exit_layers"] = [1, 2]
    config["adapter_size"] = 16
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as raised:
        AutoModelForCausalLM.from_pretrained(tmp_path / "heads")
    message = str(raised.value)
    assert "missing tensors" in message and "exit_heads.1.down.weight" in message
    assert "exit_heads.2.down.weight has shape (8, 32) where the heads need (16, 32)" in message


def test_heads_for_another_base_shape_are_refused(tmp_path):
    early_exit.add_exit_heads(_saved_base(tmp_path), [2]).save_pretrained(tmp_path / "heads")
    wider = tiny_model("llama", hidden_size=64)
    with pytest.raises(HeadMismatchError, match="hidden size: heads have 32, base has 64"):
        EarlyExitForCausalLM.from_pretrained(tmp_path / "heads", base_model=wider)
    other_architecture = tiny_model("gpt2")
    with pytest.raises(HeadMismatchError, match="model type: heads have 'llama', base has 'gpt2'"):
        EarlyExitForCausalLM.from_pretrained(tmp_path / "heads", base_model=other_architecture)


@torch.no_grad()
def test_heads_that_name_no_base_load_onto_a_given_one(tmp_path):
    base = tiny_model("opt")  # built from a config: it has no name or path
    model = _with_trained_looking_heads(early_exit.add_exit_heads(base, [1, 2]))
    model.save_pretrained(tmp_path / "heads")
    with pytest.raises(HeadMismatchError, match="base_model="):
        AutoModelForCausalLM.from_pretrained(tmp_path / "heads")
    again = EarlyExitForCausalLM.from_pretrained(tmp_path / "heads", base_model=base)
    input_ids = torch.randint(3, VOCAB, (1, 5))
    for got, want in zip(again(input_ids).exit_logits, model(input_ids).exit_logits, strict=True):
        assert torch.equal(got, want)


def test_pushing_without_the_hub_fails_clearly_and_keeps_the_local_save(tmp_path):
    model = early_exit.add_exit_heads(_saved_base(tmp_path), [2])
    with pytest.raises(HubUnreachableError, match="push the heads to me/tiny-heads.*not reachable"):
        model.push_to_hub("me/tiny-heads")
    with pytest.raises(HubUnreachableError, match="hf upload me/tiny-heads"):
        model.save_pretrained(tmp_path / "heads", push_to_hub=True, repo_id="me/tiny-heads")
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "heads"), EarlyExitForCausalLM)


class _RecordingHub:
    """Stands in for `HfApi`: records what would be uploaded, file contents included."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, allow_patterns, **kwargs):
        paths = (path.relative_to(folder_path).as_posix() for path in Path(folder_path).rglob("*") if path.is_file())
        files = sorted(path for path in paths if any(fnmatch.fnmatch(path, pattern) for pattern in allow_patterns))
        self.calls.append(("upload_folder", repo_id, files, kwargs["commit_message"]))
        return type("CommitInfo", (), {"commit_url": f"https://hub.invalid/{repo_id}/commit/1"})()


def test_push_uploads_only_the_head_files_of_the_saved_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("early_exit.hub.HfApi", _RecordingHub)
    monkeypatch.setattr(_RecordingHub, "calls", [])
    from early_exit import modeling_early_exit

    writes = []
    real_save_file = modeling_early_exit.save_file
    monkeypatch.setattr(
        modeling_early_exit, "save_file", lambda *args, **kw: writes.append(1) or real_save_file(*args, **kw)
    )
    model = early_exit.add_exit_heads(_saved_base(tmp_path), [2])
    (tmp_path / "heads").mkdir()
    (tmp_path / "heads" / "notes.txt").write_text("stays local")
    url = model.save_pretrained(tmp_path / "heads", push_to_hub=True, repo_id="me/heads", private=True)
    assert url is None  # save_pretrained returns nothing, like transformers'
    assert len(writes) == 1  # the saved folder itself is uploaded: nothing is written twice
    assert _RecordingHub.calls == [
        ("create_repo", "me/heads", True, True),
        (
            "upload_folder",
            "me/heads",
            sorted(["README.md", "config.json", "generation_config.json", "modeling_early_exit.py", WEIGHTS_NAME]),
            "Upload early-exit heads",
        ),
    ]
    assert model.push_to_hub("me/heads", commit_message="v2") == "https://hub.invalid/me/heads/commit/1"
    assert _RecordingHub.calls[-1][-1] == "v2"

    # Heads tuned jointly with a LoRA on the base push that adapter too, since they only work with it.
    from peft import LoraConfig, get_peft_model

    joint = early_exit.add_exit_heads(get_peft_model(_saved_base(tmp_path), LoraConfig(target_modules=["q_proj"])), [2])
    joint.push_to_hub("me/joint")
    uploaded = _RecordingHub.calls[-1][2]
    assert {"base_adapter/adapter_config.json", "base_adapter/adapter_model.safetensors", WEIGHTS_NAME} <= set(uploaded)
