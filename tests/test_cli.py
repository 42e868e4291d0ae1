"""The `early-exit` command line on tiny models."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import HfHubHTTPError
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import STORIES260K, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import early_exit
from early_exit import hub
from early_exit_cli import commands, main
from early_exit_cli.parser import BENCHMARKS, DTYPES, build_parser


def test_info_prints_every_exit_and_the_head_share(tmp_path, capsys):
    tiny_model("gpt2").save_pretrained(tmp_path / "base")
    main(["info", "--model", str(tmp_path / "base"), "--exit-layers", "1", "0.75", "--adapter-size", "8"])
    printed = capsys.readouterr().out
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+residual_adapter\s+([\d,]+)$", printed, flags=re.MULTILINE)
    assert rows == [("1", "0.25", "544"), ("3", "0.75", "544")]  # 2 * 32 * 8 + 32 parameters each
    assert "heads in total  1,088 parameters" in printed


def test_attention_blocks_set_the_size_of_new_attention_heads(tmp_path, capsys):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    sizes = []
    for blocks in ("1", "3"):
        main(
            [
                "info",
                "--model",
                str(tmp_path / "base"),
                "--exit-layers",
                "1",
                "--head-type",
                "attention",
                "--attention-blocks",
                blocks,
            ]
        )
        sizes.append(
            int(re.search(r"attention\s+([\d,]+)$", capsys.readouterr().out, re.MULTILINE)[1].replace(",", ""))
        )
    assert sizes[1] == 3 * sizes[0]


def test_info_takes_a_head_type_per_exit_layer_in_their_order(tmp_path, capsys):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    main(["info", "--model", str(tmp_path / "base"), "--exit-layers", "3", "1", "--head-type", "attention", "linear"])
    rows = re.findall(r"^\s+(\d+)\s+[\d.]+\s+(\w+)\s+[\d,]+$", capsys.readouterr().out, flags=re.MULTILINE)
    assert rows == [("1", "linear"), ("3", "attention")]
    with pytest.raises(SystemExit, match="head_type lists 3 head types for 2 exit layers"):
        main(
            [
                "info",
                "--model",
                str(tmp_path / "base"),
                "--exit-layers",
                "3",
                "1",
                "--head-type",
                "linear",
                "linear",
                "attention",
            ]
        )


def test_info_reads_a_saved_heads_folder(tmp_path, capsys):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    early_exit.add_exit_heads(base, [1, 3], head_type="logit_lens").save_pretrained(tmp_path / "heads")
    main(["info", "--heads", str(tmp_path / "heads")])
    printed = capsys.readouterr().out
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+(\w+)\s+([\d,]+)$", printed, flags=re.MULTILINE)
    assert rows == [("1", "0.25", "logit_lens", "0"), ("3", "0.75", "logit_lens", "0")]


def test_agreement_reports_every_exit_on_a_real_model(capsys):
    main(["agreement", "--model", str(STORIES260K), "--prompts", "3", "--max-new-tokens", "6"])
    printed = capsys.readouterr().out
    rows = re.findall(r"^\s+(\d)\s+[\d.]+\s+([\d.]+)%$", printed, flags=re.MULTILINE)
    expected = early_exit.EarlyExitConfig().resolve_exit_layers(5)  # the library's default exits, as the CLI's
    assert [int(layer) for layer, _ in rows] == expected
    assert all(0.0 <= float(rate) <= 100.0 for _, rate in rows)
    assert "18 generated tokens" in printed
    assert re.search(r"averages [\d.]+ of 5 layers", printed)


#: `early-exit train` on the tiny real model, two exits, two epochs of 1500 tokens in 64-token blocks.
TINY_TRAINING = [
    "train",
    "--model",
    str(STORIES260K),
    "--exit-layers",
    "2",
    "4",
    "--train-tokens",
    "1500",
    "--eval-tokens",
    "400",
    "--block-size",
    "64",
    "--epochs",
    "2",
    "--cache-hidden-states",
]


def test_train_writes_a_heads_folder_that_loads_and_records_its_training(tmp_path, capsys):
    output = tmp_path / "heads"
    main([*TINY_TRAINING, "--output", str(output), "--generation-tokens", "8"])
    printed = capsys.readouterr().out
    rows = re.findall(r"^\s+(\d)\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)$", printed, flags=re.MULTILINE)
    assert [row[0] for row in rows] == ["2", "4"]
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.exit_layers == [2, 4]
    training = model.config.training
    assert training["held-out agreement by exit"] == {
        layer: pytest.approx(float(after) / 100, abs=6e-4) for layer, _, after, _ in rows
    }
    assert "## Training" in (output / "README.md").read_text()
    assert (
        AutoTokenizer.from_pretrained(output)("Once").input_ids
        == AutoTokenizer.from_pretrained(STORIES260K)("Once").input_ids
    )


def test_train_writes_held_out_agreement_against_training_tokens(tmp_path, capsys):
    curve = tmp_path / "docs" / "curve.md"
    training = [
        "--generation-tokens",
        "0",
        "--gradient-accumulation",
        "2",
        "--curve",
        str(curve),
        "--curve-points",
        "3",
    ]
    main([*TINY_TRAINING, "--output", str(tmp_path / "heads"), *training])
    printed = capsys.readouterr().out
    after = re.findall(r"^\s+\d\s+[\d.]+%\s+([\d.]+)%\s+[\d.]+$", printed, flags=re.MULTILINE)
    page = curve.read_text()
    assert "--curve-points 3" in page and "![agreement against training tokens](curve.png)" in page
    assert curve.with_suffix(".png").stat().st_size > 0
    rows = re.findall(r"^\| ([\d,]+) \| (\d+) \| ([\d.]+)% \| ([\d.]+)% \|$", page, flags=re.MULTILINE)
    tokens = [int(row[0].replace(",", "")) for row in rows]
    steps = [int(row[1]) for row in rows]
    # 1500 tokens in 64-token blocks: 24 blocks, 12 steps an epoch, 24 in all; evaluated at 0, 8, 16 and 24.
    assert steps == [0, 8, 16, 24]
    assert tokens[0] == 0 and tokens == sorted(tokens) and tokens[-1] == pytest.approx(3000, abs=64)
    assert [row[2] for row in rows[-1:]] + [row[3] for row in rows[-1:]] == after  # the last point is "after"


def test_train_continues_saved_heads_on_text_they_have_not_seen(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    main([*TINY_TRAINING, "--output", str(first), "--generation-tokens", "0", "--epochs", "1"])
    capsys.readouterr()
    resumed = ["--train-tokens", "600", "--eval-tokens", "400", "--block-size", "64", "--generation-tokens", "0"]
    main(["train", "--heads", str(first), "--output", str(second), "--skip-train-tokens", "1500", *resumed])
    printed = capsys.readouterr().out
    rows = re.findall(r"^\s+(\d)\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)$", printed, flags=re.MULTILINE)
    earlier = AutoModelForCausalLM.from_pretrained(first).config.training
    # It starts where the saved heads ended (same held-out text), not from new heads.
    assert {int(layer): float(before) / 100 for layer, before, _, _ in rows} == {
        int(layer): pytest.approx(rate, abs=6e-4) for layer, rate in earlier["held-out agreement by exit"].items()
    }
    model = AutoModelForCausalLM.from_pretrained(second)
    assert model.exit_layers == [2, 4]
    assert model.config.training["continues"] == earlier
    assert model.config.training["train tokens left out (the text of a run that many tokens long)"] == 1500
    assert model.config.training["train tokens"] <= 600 + 600 // 64  # the new text, separators included
    trained, saved = model.heads_by_layer()[2], AutoModelForCausalLM.from_pretrained(first).heads_by_layer()[2]
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), saved.state_dict().values()))


@pytest.mark.parametrize(
    ("options", "message"),
    [(["--exit-layers", "2"], "--exit-layers describe new heads"), (["--lora-rank", "2"], "--lora-rank tunes")],
)
def test_train_refuses_new_head_options_with_saved_heads(tmp_path, options, message):
    with pytest.raises(SystemExit, match=message):
        main(["train", "--heads", str(tmp_path), "--output", str(tmp_path / "out"), *options])


def test_train_tunes_lora_jointly_on_a_model_with_tied_embeddings(tmp_path, capsys):
    output = tmp_path / "heads"
    sizes = ["--train-tokens", "600", "--eval-tokens", "200", "--block-size", "64", "--generation-tokens", "0"]
    main(
        ["train", "--model", str(STORIES260K), "--exit-layers", "2", "--output", str(output), "--epochs", "1"]
        + ["--lora-rank", "2", *sizes]
    )
    assert (output / "base_adapter" / "adapter_model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.config.training["joint LoRA rank"] == 2
    inner = model.base.get_base_model()
    assert inner.lm_head.weight is inner.model.embed_tokens.weight  # the base kept its tied embeddings


def test_version_is_printed(capsys):
    with pytest.raises(SystemExit) as exit_status:
        main(["--version"])
    assert exit_status.value.code == 0
    assert re.fullmatch(r"early-exit \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


def test_calibrate_stores_a_table_that_verify_measures_on_held_out_text(tmp_path, capsys):
    heads = tmp_path / "heads"
    early_exit.add_exit_heads(AutoModelForCausalLM.from_pretrained(STORIES260K), [2, 3, 4]).save_pretrained(heads)
    sizes = ["--tokens", "3000", "--block-size", "128", "--generation-tokens", "8"]
    main(["calibrate", "--heads", str(heads), "--levels", "0.6", "0.8", "--report", str(tmp_path / "cal.md"), *sizes])
    printed = capsys.readouterr().out
    assert re.search(r"^\| entropy \| [\d.]+, [\d.]+, [\d.]+ \|", printed, flags=re.MULTILINE)
    config = AutoModelForCausalLM.from_pretrained(heads).config
    assert set(config.calibration["tables"]) == {"entropy", "max_prob", "margin"}
    assert config.calibration["default_metric"] in config.calibration["tables"]
    costs = config.calibration["tables"]["entropy"]["costs"]  # measured here; thresholds chosen for speed
    assert costs["layer_ms"] > 0 and len(costs["head_ms"]) == 3
    assert re.search(r"% / [\d.]+ / [\d.]+ ms \|", printed)
    assert (tmp_path / "cal.png").is_file() and (tmp_path / "cal-exits.png").is_file()
    main(["verify-calibration", "--heads", str(heads), *sizes])
    rows = re.findall(r"^(\w+)\s+([\d.]+)\s+([\d.]+)%\s+([\d.]+)\s+(yes|NO)$", capsys.readouterr().out, re.MULTILINE)
    assert len(rows) == 6
    assert all(float(agreement) >= 100 * float(level) for _, level, agreement, _, _ in rows)


def test_calibrate_with_a_frequent_token_vocabulary_stores_it_and_generate_uses_it(tmp_path, capsys):
    heads = tmp_path / "heads"
    early_exit.add_exit_heads(AutoModelForCausalLM.from_pretrained(STORIES260K), [2, 3, 4]).save_pretrained(heads)
    sizes = ["--tokens", "2000", "--block-size", "128", "--generation-tokens", "8", "--vocabulary-tokens", "3000"]
    options = ["--levels", "0.6", "--metrics", "max_prob", "--method", "empirical", "--prune-top-k", "8"]
    with pytest.raises(SystemExit, match="--prune-vocabulary needs --prune-top-k"):
        main(["calibrate", "--heads", str(heads), "--prune-vocabulary", "64", *options[:-2], *sizes])
    main(["calibrate", "--heads", str(heads), "--prune-vocabulary", "64", *options, *sizes])
    config = AutoModelForCausalLM.from_pretrained(heads).config
    vocabulary = config.vocab_pruning["vocabulary"]
    assert len(set(vocabulary)) == 64 and config.vocab_pruning["top_k"] == 8
    assert set(config.calibration["tables"]) == {"max_prob+vocab64-top8"}
    main(["generate", "--heads", str(heads), "--level", "0.6", "--prompt", "Once upon", "--max-new-tokens", "6"])
    assert re.search(r"mean exit layer [\d.]+ of 5", capsys.readouterr().out)


def test_calibrate_on_policy_and_verify_in_free_generation(tmp_path, capsys):
    heads = tmp_path / "heads"
    early_exit.add_exit_heads(AutoModelForCausalLM.from_pretrained(STORIES260K), [2, 3, 4]).save_pretrained(heads)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\nThe little dog\nA girl named Lily\nThe sun was\n" * 3)
    sizes = ["--tokens", "2000", "--block-size", "128", "--generation-tokens", "8", "--max-new-tokens", "24"]
    options = ["--levels", "0.6", "--metrics", "max_prob", "--method", "empirical", "--prompts-file", str(prompts)]
    on_policy = ["--on-policy", "--rounds", "2", "--budgets", "4.5"]
    main(["calibrate", "--heads", str(heads), *on_policy, "--by-depth", *options, *sizes])
    assert re.search(
        r"^max_prob level 0\.6: [12] round\(s\) on \d+ tokens, (settled|not settled)", capsys.readouterr().out, re.M
    )
    table = AutoModelForCausalLM.from_pretrained(heads).config.calibration["tables"]["max_prob"]
    assert table["on_policy"]["0.6"]["rounds"] in (1, 2) and table["levels"]["0.6"]["accuracy"] >= 0.6
    assert table["budgets"]["4.5"]["mean_layers"] <= 4.5
    main(["generate", "--heads", str(heads), "--budget", "4.5", "--prompt", "Once upon", "--max-new-tokens", "6"])
    assert re.search(r"mean exit layer [\d.]+ of 5", capsys.readouterr().out)
    main(["verify-calibration", "--heads", str(heads), "--free-generation", "--prompts-file", str(prompts), *sizes])
    with pytest.raises(SystemExit, match="--tables entropy: the heads have no such table; their tables: max_prob"):
        main(["verify-calibration", "--heads", str(heads), "--tables", "entropy"])
    printed = capsys.readouterr().out
    row = re.search(r"^max_prob\s+0\.6\s+([\d.]+)%\s+([\d.]+)-([\d.]+)%\s+([\d.]+)\s+(yes|NO)", printed, re.M)
    assert row and float(row[2]) <= float(row[1]) <= float(row[3])
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(SystemExit, match="has no prompts"):
        main(
            [
                "verify-calibration",
                "--heads",
                str(heads),
                "--free-generation",
                "--prompts-file",
                str(tmp_path / "empty.txt"),
            ]
        )


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser of the command line by its prog, the benchmarks' own included (`bench` loads them by name)."""
    found, pending = {}, [build_parser()]
    while pending:
        parser = pending.pop()
        found[parser.prog] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                assert all(choice.help for choice in action._choices_actions), parser.prog
                pending.extend(action.choices.values())
    for name in BENCHMARKS:
        prog = f"early-exit bench {name}"
        found[prog] = importlib.import_module(f"early_exit_cli.benchmarks.{name}").build_parser(prog)
    return found


def _option(prog: str, flag: str) -> argparse.Action:
    return next(action for action in _parsers()[prog]._actions if flag in action.option_strings)


def test_every_option_of_every_command_has_help_that_gives_its_default():
    parsers = _parsers()
    assert {"early-exit push", "early-exit bench generate", "early-exit bench kernels"} <= set(parsers)
    for prog, parser in parsers.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction | argparse._SubParsersAction):
                continue
            where = f"{prog} {action.option_strings or action.dest}"
            assert action.help and action.help != argparse.SUPPRESS, f"{where} has no help"
            if action.default not in (None, False, [], argparse.SUPPRESS):
                values = action.default if isinstance(action.default, list) else [action.default]
                assert all(_states_default(action.help, value) for value in values), f"{where}: {action.help}"


def _states_default(text: str, value: object) -> bool:
    """Whether the help `text` says "(default ...)" with `value` in it (a path by its last two parts), or marks a
    choice "value (default)"."""
    if isinstance(value, str) and re.search(rf"\b{re.escape(value)} \([^)]*default", text):
        return True
    stated = re.search(r"default:? ([^;)]+)", text)
    if stated is None:
        return False
    if isinstance(value, str):
        return value in stated.group(1) or "/".join(Path(value).parts[-2:]) in stated.group(1)
    return any(_number(word) == float(value) for word in re.findall(r"[\w.+-]+", stated.group(1)))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def test_defaults_the_command_line_states_are_the_librarys():
    from early_exit.calibration import DEFAULT_LEVELS, DEFAULT_ROUNDS, calibrate_table
    from early_exit.data.corpus import distillation_corpus
    from early_exit.generation import DEFAULT_MAX_DRAFT_TOKENS, ExitDecodingConfig
    from early_exit.training import EarlyExitTrainingArguments

    decoding, training = ExitDecodingConfig(), EarlyExitTrainingArguments("unused")
    corpus, calibration = inspect.signature(distillation_corpus).parameters, inspect.signature(calibrate_table)
    assert _option("early-exit generate", "--kv-strategy").default == decoding.kv_strategy
    assert _option("early-exit generate", "--kernels").default == decoding.kernels
    assert _option("early-exit bench generate", "--kernels").default == decoding.kernels
    assert (
        f"default: the library's, {DEFAULT_MAX_DRAFT_TOKENS})"
        in _option("early-exit generate", "--max-draft-tokens").help
    )
    assert _option("early-exit bench speculative", "--max-draft-tokens").default == DEFAULT_MAX_DRAFT_TOKENS
    head_type = _option("early-exit info", "--head-type")
    assert head_type.default is None and f"library's, {early_exit.EarlyExitConfig().head_type})" in head_type.help
    assert set(re.search(r"e\.g\. (\w+) or (\w+)", head_type.help).groups()) <= set(early_exit.HEAD_TYPES)
    assert _option("early-exit calibrate", "--levels").default == list(DEFAULT_LEVELS)
    assert _option("early-exit calibrate", "--delta").default == calibration.parameters["delta"].default
    assert _option("early-exit calibrate", "--method").default == calibration.parameters["method"].default
    assert _option("early-exit calibrate", "--rounds").default == DEFAULT_ROUNDS
    for command in ("train", "report", "calibrate", "verify-calibration"):
        for flag, parameter in (("--block-size", "block_size"), ("--generation-tokens", "generation_tokens")):
            assert _option(f"early-exit {command}", flag).default == corpus[parameter].default, (command, flag)
    assert _option("early-exit train", "--temperature").default == training.distillation_temperature
    assert _option("early-exit train", "--exit-weighting").default == training.exit_weighting
    assert _option("early-exit train", "--top-k").default == training.distillation_top_k


@pytest.mark.parametrize(
    "prog",
    [
        f"early-exit {command}"
        for command in ("info", "agreement", "report", "calibrate", "verify-calibration", "generate")
    ]
    + ["early-exit bench generate", "early-exit bench speculative"],
)
def test_every_command_that_loads_a_model_takes_a_device_and_a_dtype(prog):
    device, dtype = _option(prog, "--device"), _option(prog, "--dtype")
    assert device.default is None and dtype.default is None  # left to the library: cpu, the weights' own dtype
    assert dtype.choices == DTYPES


def test_the_model_loads_where_and_as_asked_and_bad_devices_are_named(tmp_path, capsys, monkeypatch):
    early_exit.add_exit_heads(AutoModelForCausalLM.from_pretrained(STORIES260K), [2]).save_pretrained(tmp_path / "h")
    loaded = []
    load = early_exit.EarlyExitForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(
        early_exit.EarlyExitForCausalLM,
        "from_pretrained",
        classmethod(lambda cls, *args, **kwargs: loaded.append(load(cls, *args, **kwargs)) or loaded[-1]),
    )
    main(["info", "--heads", str(tmp_path / "h"), "--dtype", "bfloat16", "--device", "cpu"])
    (model,) = loaded
    assert model.base.dtype == torch.bfloat16 and next(model.exit_heads["2"].parameters()).dtype == torch.bfloat16
    with pytest.raises(SystemExit, match=r"^--device gpu is not a device torch knows; use e\.g\. cpu, cuda"):
        main(["info", "--heads", str(tmp_path / "h"), "--device", "gpu"])
    if not torch.cuda.is_available():
        with pytest.raises(
            SystemExit, match=r"^--device cuda:1: this machine's torch has no cuda device; use --device cpu"
        ):
            main(["info", "--heads", str(tmp_path / "h"), "--device", "cuda:1"])


def test_agreement_runs_in_the_dtype_asked_for(capsys, monkeypatch):
    dtypes = []
    measure = commands.measure_agreement
    monkeypatch.setattr(
        commands,
        "measure_agreement",
        lambda model, *args, **kw: dtypes.append(model.dtype) or measure(model, *args, **kw),
    )
    main(["agreement", "--model", str(STORIES260K), "--prompts", "1", "--max-new-tokens", "3", "--dtype", "bfloat16"])
    assert dtypes == [torch.bfloat16]
    assert "3 generated tokens" in capsys.readouterr().out


def test_options_for_new_heads_beside_saved_heads_are_refused(tmp_path):
    with pytest.raises(SystemExit, match=r"^early-exit info: --model, --adapter-size describe new heads, but --heads"):
        main(["info", "--heads", str(tmp_path), "--model", str(STORIES260K), "--adapter-size", "8"])


@settings(max_examples=25, deadline=None)
@given(count=st.integers(-3, 3), flag=st.sampled_from(["--prompts", "--max-new-tokens"]))
def test_counts_below_one_are_refused_in_one_line_naming_the_option(count, flag):
    if count >= 1:
        assert getattr(build_parser().parse_args(["agreement", flag, str(count)]), flag[2:].replace("-", "_")) == count
        return
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), pytest.raises(SystemExit) as exit_status:
        build_parser().parse_args(["agreement", flag, str(count)])
    assert exit_status.value.code == 2
    assert errors.getvalue().splitlines()[-1] == (
        f"early-exit agreement: error: argument {flag}: must be a whole number of 1 or more, got '{count}'"
    )


@settings(max_examples=25, deadline=None)
@given(
    value=st.sampled_from(["-1", "0", "0.0", "nan", "-inf", "x", "0.5", "2e-3"]),
    flag=st.sampled_from(["--epochs", "--learning-rate", "--temperature"]),
)
def test_training_rates_and_passes_must_be_above_zero(value, flag):
    command = ["train", "--output", "unused", f"{flag}={value}"]  # "=": argparse takes "-inf" for an option
    if float(value if value != "x" else "nan") > 0:
        assert getattr(build_parser().parse_args(command), flag[2:].replace("-", "_")) == float(value)
        return
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), pytest.raises(SystemExit) as exit_status:
        build_parser().parse_args(command)
    assert exit_status.value.code == 2
    assert errors.getvalue().splitlines()[-1] == (
        f"early-exit train: error: argument {flag}: must be a number above 0, got '{value}'"
    )


def test_push_offline_ends_in_one_line(tmp_path):
    early_exit.add_exit_heads(AutoModelForCausalLM.from_pretrained(STORIES260K), [2]).save_pretrained(tmp_path / "h")
    with pytest.raises(SystemExit) as exit_status:  # the suite runs with HF_HUB_OFFLINE=1
        main(["push", "--heads", str(tmp_path / "h"), "--repo-id", "someone/tiny-exits"])
    message = exit_status.value.code
    assert isinstance(message, str) and "\n" not in message  # printed on stderr, exit status 1
    assert message.startswith("early-exit push: Could not push the heads to someone/tiny-exits: the Hugging Face Hub")
    with pytest.raises(SystemExit, match=r"^early-exit push: Cannot push .*config\.json is missing"):
        main(["push", "--heads", str(tmp_path / "nothing"), "--repo-id", "someone/tiny-exits"])


def test_push_passes_its_options_and_names_a_refusal(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(hub, "upload_heads", lambda *args, **kwargs: calls.append((args, kwargs)) or "https://c/1")
    main(["push", "--heads", str(tmp_path), "--repo-id", "me/x", "--private", "--token", "t", "--commit-message", "m"])
    assert calls == [((tmp_path, "me/x"), {"private": True, "token": "t", "commit_message": "m"})]
    assert capsys.readouterr().out == "heads pushed to me/x: https://c/1\n"
    main(["push", "--heads", str(tmp_path), "--repo-id", "me/x"])
    assert calls[-1][1] == {"private": None, "token": None, "commit_message": None}  # the library's defaults

    def refuse(*args, **kwargs):
        response = types.SimpleNamespace(headers={}, request=None)  # what the error reads of an HTTP response
        message = "401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create\nmore"
        raise HfHubHTTPError(message, response=response)

    monkeypatch.setattr(hub, "upload_heads", refuse)
    with pytest.raises(SystemExit) as exit_status:
        main(["push", "--heads", str(tmp_path), "--repo-id", "me/x"])
    assert exit_status.value.code == (
        "early-exit push: the Hub refused the push to me/x (401 Client Error: Unauthorized for url: "
        "https://huggingface.co/api/repos/create); check that the token (--token, or `hf auth login`) may write there."
    )


def test_help_of_push_and_bench_loads_no_torch():
    code = (
        "import sys\nfrom early_exit_cli import main\n"
        "for argv in (['--help'], ['push', '--help'], ['bench', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules, 'early_exit' in sys.modules)"
    )
    printed = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=Path(__file__).parents[1]
    ).stdout
    assert "--repo-id" in printed and "speculative" in printed
    assert printed.splitlines()[-1] == "False False False"
