"""`early-exit generate` on the tiny real Llama (stories260k)."""

from __future__ import annotations

import re

import pytest
import torch
from tiny_models import STORIES260K
from transformers import AutoModelForCausalLM

import early_exit
from early_exit_cli import main


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread while these tests run: decoding's many tiny matmuls slow down tenfold when two threads
    compete with other processes for the machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def heads(tmp_path):
    """An untrained, uncalibrated heads folder with exits after layers 1, 2 and 3 of the 5."""
    model = early_exit.add_exit_heads(AutoModelForCausalLM.from_pretrained(STORIES260K), [1, 2, 3])
    model.config.base_model_name_or_path = str(STORIES260K)
    model.save_pretrained(tmp_path / "heads")
    return tmp_path / "heads"


def _generate(heads, max_new_tokens: int, *options: str) -> None:
    main(
        [
            "generate",
            "--heads",
            str(heads),
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            str(max_new_tokens),
            *options,
        ]
    )


def _generated(printed: str) -> str:
    return printed.split("--- prompt 1: Once upon a time\n", 1)[1].split("\n\n", 1)[0]


def _markers(printed: str) -> list[str]:
    return re.findall(r"\[(\d+)\]", _generated(printed))


def test_zero_thresholds_send_every_token_out_at_the_first_exit(heads, tmp_path, capsys):
    plot = tmp_path / "h.png"
    _generate(heads, 8, "--thresholds", "0.0", "0.0", "0.0", "--no-color", "--plot", str(plot))
    printed = capsys.readouterr().out
    # The first token comes from the prompt's full-depth pass; max_prob >= 0 holds at exit 1 for every later one.
    assert _markers(printed) == ["5"] + ["1"] * 7
    assert re.search(
        r"^8 tokens, mean exit layer 1\.5 of 5, mean layers run 1\.5, [\d.]+ tokens/s$", printed, re.MULTILINE
    )
    assert re.search(
        r"^time [\d.]+ s: layers [\d.]+ s \(\d+%\), heads [\d.]+ s \(\d+%\), cache fill", printed, re.MULTILINE
    )
    assert "\033[" not in printed
    assert plot.is_file() and plot.stat().st_size > 0


def test_without_a_level_or_thresholds_uncalibrated_heads_run_every_token_to_full_depth(heads, capsys, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    _generate(heads, 8, "--no-color")
    assert _markers(capsys.readouterr().out) == ["5"] * 8


def test_colour_is_on_only_on_a_terminal_without_no_color(heads, capsys, monkeypatch):
    arguments = ("--thresholds", "0.0", "0.0", "0.0")
    monkeypatch.delenv("NO_COLOR", raising=False)
    _generate(heads, 4, *arguments)  # captured output is not a terminal: no escape codes in pipes and files
    printed = capsys.readouterr().out
    assert _markers(printed) == ["5", "1", "1", "1"] and "\033[" not in printed
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    _generate(heads, 4, *arguments)
    printed = capsys.readouterr().out
    assert "\033[38;5;196m" in printed  # exit 1's colour, in the legend and on the generated tokens
    assert not _markers(printed)
    monkeypatch.setenv("NO_COLOR", "1")
    _generate(heads, 4, *arguments)
    assert _markers(capsys.readouterr().out) == ["5", "1", "1", "1"]


def test_the_model_loads_in_the_dtype_and_on_the_device_asked_for(heads, capsys, monkeypatch):
    loaded = []
    load = early_exit.EarlyExitForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        loaded.append(load(cls, *args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(early_exit.EarlyExitForCausalLM, "from_pretrained", classmethod(spy))
    _generate(heads, 4, "--thresholds", "0.0", "0.0", "0.0", "--dtype", "bfloat16", "--device", "cpu")
    assert _markers(capsys.readouterr().out) == ["5", "1", "1", "1"]
    (model,) = loaded
    assert model.base.dtype == torch.bfloat16 and model.device == torch.device("cpu")


def test_speculative_prints_the_full_models_text_and_the_drafts_accepted(heads, capsys):
    _generate(heads, 12, "--no-color")
    full_depth = _generated(capsys.readouterr().out)
    _generate(heads, 12, "--thresholds", "0.0", "0.0", "0.0", "--speculative", "--max-draft-tokens", "3")
    printed = capsys.readouterr().out
    text = _generated(printed)
    assert text == re.sub(r"\[\d+\]", "", full_depth)  # drafts from exit 1 change nothing in the output
    accepted, drafted = map(int, re.search(r"(\d+) of (\d+) drafts accepted", printed).groups())
    assert drafted > 0 and accepted <= drafted


def test_speculative_options_that_do_not_fit_are_refused(heads):
    with pytest.raises(SystemExit, match="max_draft_tokens only applies with speculative"):
        _generate(heads, 4, "--max-draft-tokens", "3")
    with pytest.raises(SystemExit, match="kv_strategy='deferred'"):
        _generate(heads, 4, "--speculative", "--kv-strategy", "propagate", "--thresholds", "0.5", "0.5", "0.5")


def test_compare_runs_plain_generate_beside_and_counts_tokens_equal_to_the_full_models(heads, capsys):
    _generate(heads, 6, "--compare", "--no-color")
    printed = capsys.readouterr().out
    assert _markers(printed) == ["5"] * 6
    assert re.search(r"mean layers run 5\.0, 6 of 6 equal to the full model's greedy token$", printed, re.M)
    summary = r"^early exit ([\d.]+) tokens/s, plain base\.generate ([\d.]+) tokens/s: ([\d.]+)x; ([\d.]+)% of (\d+) "
    speed, base, ratio, share, total = re.search(summary, printed, re.M).groups()
    assert float(ratio) == pytest.approx(float(speed) / float(base), rel=0.01, abs=0.006)
    assert (share, total) == ("100.0", "6")  # at full depth every token is the full model's greedy token

    _generate(heads, 6, "--compare", "--no-color", "--thresholds", "0.0", "0.0", "0.0", "--prompt", "The little dog")
    printed = capsys.readouterr().out
    assert _markers(printed) == ["5"] + ["1"] * 5
    counts = [tuple(map(int, pair)) for pair in re.findall(r"(\d+) of (\d+) equal to the full model's", printed)]
    assert len(counts) == 2 and all(agreed <= total == 6 for agreed, total in counts)
    share, total = re.search(summary, printed, re.M).groups()[3:]
    assert (float(share), int(total)) == (pytest.approx(100 * sum(a for a, _ in counts) / 12, abs=0.05), 12)


def test_compare_refuses_what_it_cannot_measure(heads):
    with pytest.raises(SystemExit, match=r"^early-exit generate: --compare times greedy .* not --sample; give one"):
        _generate(heads, 4, "--compare", "--sample")
    with pytest.raises(SystemExit, match="not --speculative .*early-exit bench speculative"):
        _generate(heads, 4, "--compare", "--speculative")
