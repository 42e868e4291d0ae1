"""Fault injection: saves killed at every step, readers and writers racing, read-only and damaged folders,
hand-edited configs and command-line mistakes. Each must end in the old or the new heads, or in one clear error.

Kills, readers and writers run in forked children of the test process (the model is already built there, so a child
starts in milliseconds); a child's kill point is injected by wrapping the file-system calls a save makes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from tiny_models import STORIES260K, tiny_model
from transformers import AutoModelForCausalLM

import early_exit
from early_exit import CheckpointError, EarlyExitConfig, EarlyExitForCausalLM, modeling_early_exit
from early_exit import checkpoint as checkpoint_module
from early_exit.checkpoint import WEIGHTS_NAME, check_writable, read_head_weights
from early_exit.hub import upload_heads
from early_exit_cli import main

# The calls a save makes to the file system; a kill before any one of them is one fault-injection case.
STEPS = {
    os: ("mkdir", "rename", "replace", "link", "symlink", "unlink", "rmdir", "fsync", "chmod"),
    checkpoint_module: ("_exchange",),
    modeling_early_exit: ("save_file",),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Llama saved to disk and loaded back, so that heads name a real path."""
    folder = tmp_path_factory.mktemp("base") / "llama"
    tiny_model("llama").save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def versions(base):
    """Two heads for the same exits that differ only in their weights and their `training` tag: a config of one
    paired with the weights of the other would load without complaint, so every load checks the pair."""
    models = {}
    for seed, tag in enumerate("AB"):
        model = early_exit.add_exit_heads(base, [1, 3], adapter_size=8)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.exit_heads.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
        model.config.training = {"tag": tag}
        models[tag] = model
    return models


def _loaded_tag(path: Path, versions: dict, base=None) -> str:
    """Load the heads at `path` and return their tag, after checking that their weights are that version's."""
    if base is None:
        model = AutoModelForCausalLM.from_pretrained(path)
    else:
        model = EarlyExitForCausalLM.from_pretrained(path, base_model=base)
    tag = model.config.training["tag"]
    for got, want in zip(model.exit_heads.parameters(), versions[tag].exit_heads.parameters(), strict=True):
        assert torch.equal(got, want), f"config of {tag} loaded with other weights"
    return tag


def _debris(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith("."))


def _fork(work, timeout: float = 120.0) -> int:
    """Run `work()` in a forked child; return its exit code (0: done, 1: raised, -9: SIGKILLed)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("a child hung")


def _kill_before_step(step: int) -> None:
    """In a child: SIGKILL this process just before its `step`-th file-system call (counting from 1)."""
    calls = iter(range(1, 10**6))
    for owner, names in STEPS.items():
        for name in names:
            original = getattr(owner, name)

            def counted(*args, _original=original, **kwargs):
                if next(calls) == step:
                    os.kill(os.getpid(), signal.SIGKILL)
                return _original(*args, **kwargs)

            setattr(owner, name, counted)


def _without_exchange() -> None:
    """In a child: behave as on a file system that cannot exchange two folders (two renames instead)."""
    checkpoint_module._exchange = lambda first, second: False


@pytest.mark.parametrize("scenario", ["replace", "first save", "replace without exchange"])
def test_a_save_killed_at_any_step_leaves_old_or_new_heads_and_the_next_save_no_debris(
    tmp_path, base, versions, scenario
):
    target = tmp_path / "heads"
    if scenario != "first save":
        versions["A"].save_pretrained(target)
        (target / "notes.txt").write_text("mine")
    outcomes = []
    for step in range(1, 200):

        def save_new_heads(step=step):
            if scenario == "replace without exchange":
                _without_exchange()
            _kill_before_step(step)
            versions["B"].save_pretrained(target)

        code = _fork(save_new_heads)
        if code == 0:  # the save made fewer calls than `step`: every step has been tried
            break
        assert code == -signal.SIGKILL, f"the save raised instead of being killed at step {step}"
        if scenario == "first save" and not target.exists():
            outcomes.append("none")
        else:
            outcomes.append(_loaded_tag(target, versions, base))  # loading also recovers a set-aside folder
        if scenario != "first save":
            assert (target / "notes.txt").read_text() == "mine"  # in the old folder and the new one alike
        versions["A"].save_pretrained(target)  # the next save
        assert _debris(tmp_path) == [], f"step {step}"
        assert _loaded_tag(target, versions, base) == "A"
        if scenario == "first save":
            shutil.rmtree(target)
    print(f"\n{scenario}: {len(outcomes)} kill points, outcomes {''.join(o[0] for o in outcomes)}")
    assert len(outcomes) >= 15  # the injection reached the save's steps
    old = {"replace": "A", "replace without exchange": "A", "first save": "n"}[scenario]
    assert {outcome[0] for outcome in outcomes} == {old, "B"}  # kills before and after the swap both happened


def test_a_reader_in_a_loop_during_saves_always_loads_one_whole_version(tmp_path, base, versions):
    target = tmp_path / "heads"
    versions["A"].save_pretrained(target)
    stop = tmp_path / "stop"

    def keep_saving():
        while not stop.exists():
            for tag in "BA":
                versions[tag].save_pretrained(target)

    seen = []
    writer = os.fork()
    if writer == 0:
        try:
            keep_saving()
        finally:
            os._exit(0)
    try:
        for index in range(60):
            seen.append(_loaded_tag(target, versions, None if index % 10 == 0 else base))
    finally:
        stop.touch()
        os.waitpid(writer, 0)
    assert set(seen) == {"A", "B"}  # saves landed while reading
    assert _debris(tmp_path) == []


def test_two_writers_and_a_reader_never_fail_and_leave_no_debris(tmp_path, base, versions):
    target = tmp_path / "heads"
    versions["A"].save_pretrained(target)

    def writer(tag):
        def work():
            for _ in range(40):
                versions[tag].save_pretrained(target)

        return work

    children = []
    for tag in "AB":
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                writer(tag)()
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    seen = [_loaded_tag(target, versions, base) for _ in range(30)]
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    assert codes == [0, 0]  # no writer failed
    assert set(seen) <= {"A", "B"}
    assert _debris(tmp_path) == []
    assert _loaded_tag(target, versions, base) in {"A", "B"}


def test_a_live_saves_staging_folder_survives_another_save_and_a_dead_ones_does_not(tmp_path, versions):
    target = tmp_path / "heads"
    versions["A"].save_pretrained(target)
    live = tmp_path / ".heads.saving-live"
    dead = tmp_path / ".heads.saving-dead"
    set_aside = tmp_path / ".heads.old-dead"
    for folder in (live, dead, set_aside / "heads"):
        folder.mkdir(parents=True)
    descriptor = os.open(live, os.O_RDONLY)
    fcntl.flock(descriptor, fcntl.LOCK_EX)  # as a save in progress holds it
    try:
        versions["B"].save_pretrained(target)
        assert _debris(tmp_path) == [".heads.saving-live"]
    finally:
        os.close(descriptor)
    versions["A"].save_pretrained(target)
    assert _debris(tmp_path) == []


def test_a_folder_lost_between_two_renames_by_an_older_save_is_recovered_on_load(tmp_path, base, versions):
    target = tmp_path / "heads"
    versions["A"].save_pretrained(target)
    set_aside = tmp_path / ".heads.old-x1y2"  # what a kill between the two renames of a save used to leave
    set_aside.mkdir()
    os.rename(target, set_aside / "heads")
    assert _loaded_tag(target, versions, base) == "A"
    assert target.is_dir()


def test_a_save_failing_between_two_renames_puts_the_old_folder_back_at_once(tmp_path, base, versions, monkeypatch):
    target = tmp_path / "heads"
    versions["A"].save_pretrained(target)
    monkeypatch.setattr(checkpoint_module, "_exchange", lambda first, second: False)  # the two-rename path
    real_rename = os.rename
    staging_renames = []

    def second_staging_rename_fails(source, destination):
        if ".heads.saving-" in str(source):
            staging_renames.append(source)
            if len(staging_renames) == 2:  # the first tries a plain rename; the second follows setting A aside
                raise OSError(5, "Input/output error")
        return real_rename(source, destination)

    monkeypatch.setattr(os, "rename", second_staging_rename_fails)
    with pytest.raises(OSError, match="Input/output error"):
        versions["B"].save_pretrained(target)
    monkeypatch.setattr(os, "rename", real_rename)
    assert _debris(tmp_path) == []
    assert _loaded_tag(target, versions, base) == "A"


def test_saving_through_a_symlink_keeps_the_link(tmp_path, base, versions):
    real = tmp_path / "store" / "heads"
    versions["A"].save_pretrained(real)
    link = tmp_path / "heads"
    link.symlink_to(real, target_is_directory=True)
    versions["B"].save_pretrained(link)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert _loaded_tag(link, versions, base) == "B"
    assert _debris(tmp_path) == [] and _debris(real.parent) == []


def test_a_stale_base_adapter_is_neither_kept_nor_pushed(tmp_path, base, versions, monkeypatch):
    target = tmp_path / "heads"
    joint = early_exit.add_exit_heads(get_peft_model(base, LoraConfig(target_modules=["q_proj"])), [1, 3])
    joint.save_pretrained(target)
    assert (target / "base_adapter").is_dir()
    versions["A"].save_pretrained(target)
    assert not (target / "base_adapter").exists()

    uploaded = []

    class Hub:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, allow_patterns, **kwargs):
            uploaded.extend(allow_patterns)
            return type("Commit", (), {"commit_url": "https://hub.invalid"})()

    monkeypatch.setattr("early_exit.hub.HfApi", Hub)
    (target / "base_adapter").mkdir()  # left by hand, or by an older release
    upload_heads(target, "me/heads")
    assert not any(pattern.startswith("base_adapter") for pattern in uploaded)


def test_read_only_targets_fail_before_and_at_saving_with_the_folder_named(versions):
    outside = tempfile.TemporaryDirectory()  # pytest's own folders are private to root; this one is opened to all
    os.chmod(outside.name, 0o755)
    parent = Path(outside.name) / "shared"
    versions["A"].save_pretrained(parent / "heads")
    before = (parent / "heads" / WEIGHTS_NAME).read_bytes()
    os.chmod(parent, 0o555)

    def save_as_another_user():
        if os.geteuid() == 0:  # root writes anywhere: drop to an ordinary user, as a read-only mount would behave
            os.setgid(65534)
            os.setuid(65534)
        for target in (parent / "heads", parent / "new"):
            with pytest.raises(CheckpointError, match=f"Cannot save to {target}.*Choose a folder you can write"):
                check_writable(target)
            with pytest.raises(CheckpointError, match=f"Cannot save to {target}"):
                versions["B"].save_pretrained(target)

    try:
        assert _fork(save_as_another_user) == 0
        assert (parent / "heads" / WEIGHTS_NAME).read_bytes() == before
        assert sorted(os.listdir(parent)) == ["heads"]
    finally:
        os.chmod(parent, 0o755)
        outside.cleanup()


def test_a_file_in_the_way_is_reported_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        check_writable(tmp_path / "file")
    with pytest.raises(CheckpointError, match="file is a file, not a folder"):
        check_writable(tmp_path / "file" / "heads")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, versions):
    """A saved heads folder's config and weights, as bytes."""
    folder = tmp_path_factory.mktemp("saved") / "heads"
    versions["A"].save_pretrained(folder)
    return {name: (folder / name).read_bytes() for name in ("config.json", WEIGHTS_NAME)}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keep=st.floats(min_value=0.0, max_value=0.999), name=st.sampled_from(["config.json", WEIGHTS_NAME]))
def test_a_truncated_file_is_a_clear_error_wherever_it_ends(tmp_path, saved, keep, name):
    folder = tmp_path / "heads"
    folder.mkdir(exist_ok=True)
    for file_name, content in saved.items():
        # Cut before the last byte that is not white space: whatever is left is not a whole file.
        cut = content[: int(keep * len(content.rstrip()))]
        (folder / file_name).write_bytes(cut if file_name == name else content)
    if name == WEIGHTS_NAME:
        with pytest.raises(CheckpointError, match="corrupt or was only partly written"):
            read_head_weights(folder / name)
    else:
        with pytest.raises(OSError, match="config"):
            EarlyExitConfig.from_pretrained(folder)


def test_a_missing_config_is_named_and_not_read_as_a_default_one(tmp_path, versions):
    versions["A"].save_pretrained(tmp_path / "heads")
    (tmp_path / "heads" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        EarlyExitForCausalLM.from_pretrained(tmp_path / "heads")


def _calibration(thresholds, levels=True, default="entropy"):
    table = {"metric": "entropy", "method": "empirical", "exit_layers": [1, 3]}
    if levels:
        table["levels"] = {"0.9": {"thresholds": thresholds, "accuracy": 0.9, "mean_layers": 3.0}}
    return {"default_metric": default, "tables": {"entropy": table}}


LEVEL = r"calibration.tables\['entropy'\].levels\['0.9'\]"
HAND_EDITS = [
    ({"exit_layers": [1.0, 3]}, r"exit_layers\[0\]=1.0: a float is a fraction of depth .* as an integer \(1\)"),
    ({"exit_layers": [True, 3]}, r"exit_layers\[0\]=True must be a layer number"),
    ({"exit_layers": []}, "exit_layers is empty"),
    ({"exit_layers": "1, 3"}, "exit_layers must be a list"),
    ({"exit_layers": [0, 3]}, r"exit_layers\[0\]=0 is outside the model: layer numbers start at 1"),
    ({"adapter_size": 0}, "adapter_size must be a positive integer"),
    ({"adapter_size": "8"}, "adapter_size must be a positive integer"),
    ({"attention_blocks": 0}, "attention_blocks must be a positive integer"),
    ({"head_type": ""}, "head_type must be a head type's name"),
    ({"head_type": ["attention", 3]}, "head_type must be a head type's name, or a list of names"),
    ({"head_type": ["attention"]}, "head_type lists 1 head types for 2 exit layers"),
    ({"base_adapter": "../elsewhere"}, "base_adapter='../elsewhere' must name a subfolder"),
    ({"base_adapter": "/abs/lora"}, "base_adapter='/abs/lora' must name a subfolder"),
    ({"base_model_name_or_path": "./base"}, "base_model_name_or_path='./base' is neither a Hub id nor an absolute"),
    ({"base_hidden_size": -32}, "base_hidden_size must be a positive integer"),
    ({"vocab_pruning": {"k": 4}}, "vocab_pruning: .*needs top_k"),
    ({"training": ["step 1"]}, "training must be a dict"),
    (
        {"calibration": _calibration([0.5])},
        rf"{LEVEL}.thresholds has 1 values for the 2 exits \[1, 3\]; calibrate",
    ),
    ({"calibration": _calibration([0.5, 0.5, 0.5])}, rf"{LEVEL}.thresholds has 3 values for the 2 exits"),
    ({"calibration": _calibration([0.5, "x"])}, rf"{LEVEL}.thresholds\[1\]='x' must be a number or null"),
    ({"calibration": _calibration([0.5, 0.5], levels=False)}, r"calibration.tables\['entropy'\] has no 'levels'"),
    ({"calibration": _calibration([0.5, 0.5], default="margin")}, "calibration.default_metric='margin' names none"),
    ({"calibration": [1, 2]}, "calibration must be a dict"),
]


@pytest.mark.parametrize(
    ("edit", "message"), HAND_EDITS, ids=[f"{next(iter(edit))}-{index}" for index, (edit, _) in enumerate(HAND_EDITS)]
)
def test_a_hand_edited_config_fails_on_loading_naming_the_field(tmp_path, versions, edit, message):
    versions["A"].save_pretrained(tmp_path / "heads")
    config_file = tmp_path / "heads" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **edit}))
    with pytest.raises(CheckpointError, match=f"config.json is not valid: {message}"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "heads")


def test_a_base_adapter_symlinked_outside_the_folder_is_refused(tmp_path, base):
    joint = early_exit.add_exit_heads(get_peft_model(base, LoraConfig(target_modules=["q_proj"])), [1, 3])
    joint.save_pretrained(tmp_path / "heads")
    os.rename(tmp_path / "heads" / "base_adapter", tmp_path / "elsewhere")
    (tmp_path / "heads" / "base_adapter").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="leads outside the heads folder"):
        EarlyExitForCausalLM.from_pretrained(tmp_path / "heads")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
FIELDS = [
    name
    for name in ("base_model_name_or_path", "base_model_revision", "exit_layers", "head_type", "adapter_size")
    + ("base_model_type", "base_hidden_size", "base_num_hidden_layers", "base_vocab_size", "base_adapter")
    + ("training", "calibration", "vocab_pruning", "save_id")
]


@settings(max_examples=400, deadline=None)
@given(field=st.sampled_from(FIELDS), value=JSON_VALUES)
def test_any_json_value_in_any_field_loads_or_fails_with_a_checkpoint_error(field, value):
    try:
        config = EarlyExitConfig.from_dict({"model_type": "early_exit", field: value})
    except CheckpointError as error:
        assert field in str(error)
        return
    assert getattr(config, field) == value or value != value  # kept as written (NaN never equals itself)


def test_the_base_is_recorded_by_its_absolute_path_and_loaded_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_model("llama").save_pretrained("base")
    heads = early_exit.add_exit_heads(AutoModelForCausalLM.from_pretrained("base"), [1, 3])
    heads.save_pretrained("heads")
    assert json.loads(Path("heads/config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "base")
    monkeypatch.chdir("/")
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "heads"), EarlyExitForCausalLM)


@pytest.mark.parametrize("given_value", [None, True])
def test_the_base_loads_without_remote_code_unless_asked(tmp_path, versions, monkeypatch, given_value):
    versions["A"].save_pretrained(tmp_path / "heads")
    asked = []
    real_load = modeling_early_exit.load_base_model

    def recording_load(name, revision=None, **kwargs):
        asked.append(kwargs["trust_remote_code"])
        return real_load(name, revision, **kwargs)

    monkeypatch.setattr(modeling_early_exit, "load_base_model", recording_load)
    extra = {} if given_value is None else {"trust_remote_code": given_value}
    AutoModelForCausalLM.from_pretrained(tmp_path / "heads", **extra)
    assert asked == [bool(given_value)]


def _one_line_exit(argv: list[str], capsys) -> str:
    """Run the command line, expecting it to stop with one line (and no traceback)."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    message = str(stopped.value.code)
    assert "\n" not in message and "Traceback" not in capsys.readouterr().err
    return message


def test_command_line_mistakes_end_in_one_line_before_any_long_work(tmp_path, versions, capsys, monkeypatch):
    loads = []
    monkeypatch.setattr("early_exit_cli.commands.load_base_model", lambda *args, **kwargs: loads.append(args))
    (tmp_path / "file").write_text("x")
    assert "give --checkpoint-dir too" in _one_line_exit(["train", "--output", str(tmp_path / "h"), "--resume"], capsys)
    assert "file is a file, not a folder" in _one_line_exit(["train", "--output", str(tmp_path / "file/h")], capsys)
    assert loads == []  # refused before the model was loaded
    assert "--prompt is empty" in _one_line_exit(["generate", "--prompt", ""], capsys)
    assert "accuracy_level=1.5 is outside" in _one_line_exit(["generate", "--level", "1.5"], capsys)
    versions["A"].save_pretrained(tmp_path / "heads")
    config_file = tmp_path / "heads" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "adapter_size": 0}))
    message = _one_line_exit(["info", "--heads", str(tmp_path / "heads")], capsys)
    assert message.startswith("early-exit info: The heads' config.json is not valid: adapter_size")


@pytest.mark.skipif(not STORIES260K.is_dir(), reason="shared/models/stories260k is not beside the checkout")
def test_training_refuses_blocks_longer_than_the_model_and_empty_text(tmp_path, capsys):
    common = ["train", "--model", str(STORIES260K), "--output", str(tmp_path / "heads"), "--generation-tokens", "0"]
    common += ["--eval-tokens", "100"]
    assert "longer than the model's" in _one_line_exit([*common, "--block-size", "100000"], capsys)
    (tmp_path / "empty.txt").write_text("")
    message = _one_line_exit([*common, "--block-size", "64", "--train-files", str(tmp_path / "empty.txt")], capsys)
    assert "the train text is empty" in message
    assert not (tmp_path / "heads").exists()


@pytest.mark.skipif(not STORIES260K.is_dir(), reason="shared/models/stories260k is not beside the checkout")
def test_training_without_checkpoints_leaves_no_temporary_folder(tmp_path, monkeypatch, capsys):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a little fox who liked to run in the woods. " * 20)
    files = ["--train-files", str(text), "--eval-files", str(text), "--generation-tokens", "0"]
    sizes = ["--train-tokens", "120", "--eval-tokens", "60", "--block-size", "32", "--epochs", "1"]
    main(
        [
            "train",
            "--model",
            str(STORIES260K),
            "--exit-layers",
            "2",
            "--output",
            str(tmp_path / "heads"),
            *files,
            *sizes,
        ]
    )
    assert (tmp_path / "heads" / WEIGHTS_NAME).is_file()
    assert os.listdir(scratch) == []
