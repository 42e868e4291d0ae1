"""`early-exit bench` and the `examples/benchmark_*.py` scripts that run the same benchmarks, on the tiny real Llama
(stories260k): the reports and plots they write, and the commands the docs give."""

from __future__ import annotations

import importlib
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
import torch
from test_generate_cli import one_thread  # noqa: F401 (autouse here too: the benchmarks decode as generate does)
from tiny_models import STORIES260K
from transformers import AutoModelForCausalLM, AutoTokenizer

import early_exit
from early_exit.calibration import calibrate_table, collect_exit_scores, store_calibration
from early_exit.data.corpus import TokenBlocks
from early_exit_cli import main

ROOT = Path(__file__).resolve().parents[1]
LEVEL = "0.8"


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> Path:
    """Heads after layers 1, 2 and 3 of stories260k's 5, calibrated (max_prob, level 0.8) on random tokens.
    stories260k's tokenizer names no pad token, and the benchmarks pad batches: they must cope."""
    folder = tmp_path_factory.mktemp("bench")
    assert AutoTokenizer.from_pretrained(STORIES260K).pad_token is None
    model = early_exit.add_exit_heads(AutoModelForCausalLM.from_pretrained(STORIES260K), [1, 2, 3]).eval()
    generator = torch.Generator().manual_seed(0)
    blocks = TokenBlocks([torch.randint(3, 512, (64,), generator=generator).tolist() for _ in range(16)])
    scores = collect_exit_scores(model, blocks, ["max_prob"])
    store_calibration(model.config, [calibrate_table(scores, "max_prob", (float(LEVEL),))], default_metric="max_prob")
    model.save_pretrained(folder / "heads")
    return folder / "heads"


def test_bench_generate_writes_its_report_and_plot(heads, tmp_path):
    report = tmp_path / "generation.md"
    options = ["--heads", str(heads), "--prompts", "1", "--max-new-tokens", "4", "--levels", LEVEL]
    options += ["--batch-sizes", "1", "2", "--batch-level", LEVEL, "--batch-tokens", "3", "--output", str(report)]
    main(["bench", "generate", *options])
    page = report.read_text()
    assert f"early-exit bench generate {' '.join(options)}" in page  # the command that wrote it
    assert report.with_suffix(".png").stat().st_size > 0
    rows = dict(re.findall(r"^\| ([\w ,.]+) \| off \| [\d.]+ \| [\d.]+x \| ([\d.]+)% \| [\d.]+ of 5 \|", page, re.M))
    assert set(rows) == {"full depth, stock kernels", "full depth", f"level {LEVEL}"}
    # At full depth every token is the full model's greedy token, whichever kernels compute it.
    assert rows["full depth, stock kernels"] == rows["full depth"] == "100.0"
    batch_rows = re.findall(r"^\| (\d) \| [\d.]+ \| [\d.]+ \| [\d.]+x \| [\d.]+ \|$", page, re.M)
    assert batch_rows == ["1", "2"]


def test_bench_speculative_writes_its_report_and_plot_and_stays_lossless(heads, tmp_path):
    report = tmp_path / "speculative.md"
    options = ["--heads", str(heads), "--prompts", "1", "--max-new-tokens", "6", "--assistant-exits", "2"]
    options += ["--fixed-exits", "2", "--draft-lengths", "2", "--levels", LEVEL, "--prompt-lookup", "2"]
    options += ["--output", str(report)]
    main(["bench", "speculative", *options])
    page = report.read_text()
    assert f"early-exit bench speculative {' '.join(options)}" in page
    assert report.with_suffix(".png").stat().st_size > 0
    rows = re.findall(
        r"^\| ([\w ]+) \| ([\w=,.+ ]+) \| [\d.]+ \| [\d.]+x \| [\d.]+ \| [\w./%]+ \| ([^|]+) \|$", page, re.M
    )
    settings = {(method, setting) for method, setting, _ in rows}
    assert settings == {
        ("plain generate", "greedy"),
        ("assistant_early_exit", "E=2"),
        ("fixed drafter", "E=2, K=2"),
        ("DSSD", f"level {LEVEL}"),
        ("prompt lookup", "K=2"),
        ("DSSD", "full depth + lookup K=2"),
        ("DSSD", f"level {LEVEL} + lookup K=2"),
    }
    # Drafts are verified by the full model: each speculative row's output is plain greedy generate's.
    assert {identical for method, _, identical in rows if method != "plain generate"} == {"yes"}


def _documented_commands() -> list[tuple[str, list[str]]]:
    """(benchmark, arguments) of every `python examples/benchmark_*.py` command with arguments in docs/*.md."""
    commands = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        text = page.read_text(encoding="utf-8").replace("\\\n", " ")
        for name, arguments in re.findall(r"python examples/benchmark_(\w+)\.py([^`\n]*)", text):
            if arguments.strip():
                commands.append((name, shlex.split(arguments)))
    return commands


def test_every_benchmark_command_in_the_docs_still_parses():
    commands = _documented_commands()
    assert {name for name, _ in commands} == {"generate", "speculative", "kernels"}
    for name, arguments in commands:
        args = importlib.import_module(f"early_exit_cli.benchmarks.{name}").build_parser().parse_args(arguments)
        assert args.output and args.output.startswith("docs/"), (name, arguments)


@pytest.mark.parametrize("name", ["generate", "speculative", "kernels"])
def test_the_example_scripts_run_the_installed_benchmarks(name, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [f"benchmark_{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_status:
        runpy.run_path(str(ROOT / "examples" / f"benchmark_{name}.py"), run_name="__main__")
    assert exit_status.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"usage: benchmark_{name}.py ")
    # The same options as `early-exit bench NAME`.
    assert (
        printed.split("\n\n", 1)[1]
        == (
            importlib.import_module(f"early_exit_cli.benchmarks.{name}")
            .build_parser()
            .format_help()
            .split("\n\n", 1)[1]
        )
    )


def test_a_mistake_in_a_benchmarks_options_names_it(capsys):
    with pytest.raises(SystemExit) as exit_status:
        main(["bench", "kernels", "--rows", "0"])
    assert exit_status.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[0].startswith("usage: early-exit bench kernels")
    assert error[-1] == "early-exit bench kernels: error: argument --rows: must be a whole number of 1 or more, got '0'"
