"""The documentation cannot rot: the API reference builds from the docstrings and shows every public name's, and the
Python blocks of README.md and docs/getting-started.md run as written (the default model swapped for a tiny
stand-in, the text they train and calibrate on cut short)."""

from __future__ import annotations

import html
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from default_model_stand_in import ROOT, SHIPPED_HEADS, load_script, stand_in_default_model
from hypothesis import given
from hypothesis import strategies as st

import early_exit
from early_exit.data import corpus

PAGES = [ROOT / "README.md", ROOT / "docs" / "getting-started.md"]
#: Put just before a block that cannot run in the tests, with the reason: `<!-- not run: needs the network -->`.
NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<reason>[^>]*?)\s*-->\s*\Z")
FENCE = re.compile(r"^```python[ \t]*\n(?P<code>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
#: The most text the snippets' `distillation_corpus` calls get, and the fewest tokens they generate per prompt.
MAX_TOKENS, GENERATION_TOKENS = 2_000, 4


@dataclass(frozen=True)
class CodeBlock:
    """A ```python block of a Markdown page: the line its code starts on, the code, and why it is not run (if so)."""

    line: int
    code: str
    not_run: str | None


def python_blocks(text: str) -> list[CodeBlock]:
    """The ```python blocks of a Markdown text, in order, each with the reason of a `not run` marker just before it."""
    blocks = []
    for fence in FENCE.finditer(text):
        marker = NOT_RUN.search(text[: fence.start()])
        line = text.count("\n", 0, fence.start("code")) + 1
        blocks.append(CodeBlock(line, fence.group("code"), marker.group("reason") if marker else None))
    return blocks


def run_page(page: Path) -> list[CodeBlock]:
    """Run the page's unmarked Python blocks in order in one namespace, as a reader pasting them into one session
    would; returns the blocks run. A failure's traceback names the page and its line."""
    namespace = {"__name__": "__main__"}
    ran = []
    for block in python_blocks(page.read_text(encoding="utf-8")):
        if block.not_run is None:
            exec(compile("\n" * (block.line - 1) + block.code, str(page), "exec"), namespace)
            ran.append(block)
    return ran


# --- finding the blocks ---------------------------------------------------------------------------------------------
_LINE = st.text(st.characters(codec="ascii", exclude_characters="`<>\r\n"), max_size=20)
_BLOCK = st.tuples(
    st.sampled_from(["python", "bash", ""]),
    st.lists(_LINE, min_size=1, max_size=3),
    st.none() | st.text(st.characters(codec="ascii", exclude_characters="<>-\r\n"), min_size=1, max_size=20),
    st.lists(_LINE, max_size=2),
)


@given(st.lists(_BLOCK, max_size=5))
def test_python_blocks_are_found_in_order_with_their_lines_and_markers(parts):
    lines, expected = [], []
    for language, code, reason, prose in parts:
        lines += [f"prose {text}" for text in prose]
        if reason is not None:
            lines.append(f"<!-- not run: {reason} -->")
        lines.append(f"```{language}")
        if language == "python":
            expected.append(CodeBlock(len(lines) + 1, "".join(text + "\n" for text in code), reason and reason.strip()))
        lines += code
        lines.append("```")
    assert python_blocks("\n".join(lines) + "\n") == expected


def test_a_marker_counts_only_just_before_its_block():
    text = "<!-- not run: offline -->\n\nprose\n```python\nx = 1\n```\n<!-- not run: offline -->\n```python\ny\n```\n"
    assert [block.not_run for block in python_blocks(text)] == [None, "offline"]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_python_block_of_the_page_is_found_and_every_skip_has_a_reason(page):
    text = page.read_text(encoding="utf-8")
    blocks = python_blocks(text)
    # A block in another form (indented, "```py") would be silently skipped: there are none.
    assert len(blocks) == len(re.findall(r"```py", text)) >= 3
    skipped = [block for block in blocks if block.not_run is not None]
    assert len(skipped) == text.count("<!-- not run:")  # no marker is left without its block
    assert all(block.not_run for block in skipped)


# --- running them ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """The default model and the shipped heads swapped for tiny stand-ins, and `distillation_corpus` cut short."""
    root = tmp_path_factory.mktemp("stand-in")
    full_size = corpus.distillation_corpus

    def cut_short(*args, **kwargs):
        call = inspect.signature(full_size).bind(*args, **kwargs)
        call.apply_defaults()
        call.arguments["max_tokens"] = min(call.arguments["max_tokens"], MAX_TOKENS)
        call.arguments["generation_tokens"] = min(call.arguments["generation_tokens"], GENERATION_TOKENS)
        return full_size(*call.args, **call.kwargs)

    with stand_in_default_model(root), pytest.MonkeyPatch.context() as patch:
        patch.setattr(corpus, "distillation_corpus", cut_short)
        yield root


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_the_pages_python_blocks_run_as_written(page, stand_in, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what the blocks save lands here; the heads they load are the stand-in's
    (tmp_path / SHIPPED_HEADS).parent.mkdir()
    (tmp_path / SHIPPED_HEADS).symlink_to(stand_in / SHIPPED_HEADS)
    ran = run_page(page)
    assert ran == [block for block in python_blocks(page.read_text(encoding="utf-8")) if block.not_run is None]
    assert len(ran) >= 3


# --- the API reference ----------------------------------------------------------------------------------------------
def _sections(page: Path) -> dict[str, str]:
    """The text of each documented name's section on a pdoc page, up to the next name's (a class: up to its first
    member), with tags dropped and spaces collapsed."""
    parts = re.split(r'<section id="([^"]+)">', page.read_text(encoding="utf-8"))
    return {name: _plain(body) for name, body in zip(parts[1::2], parts[2::2])}


def _plain(text: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", text)).split())


def test_the_api_reference_builds_cleanly_and_shows_every_public_names_docstring(tmp_path):
    builder = load_script(ROOT / "docs" / "build_api.py")
    assert builder.build_api_reference(tmp_path) == []
    pages = {".".join(path.relative_to(tmp_path).with_suffix("").parts) for path in tmp_path.rglob("*.html")}
    modules = builder.public_modules()
    assert {"early_exit.training", "early_exit.data.corpus", "early_exit.generation"} <= set(modules) <= pages
    sections = _sections(tmp_path / "early_exit.html")
    for name in early_exit.__all__:
        assert name in sections, f"{name} is not in the reference"
        value = getattr(early_exit, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__doc__, f"{name} has no docstring"
            summary = _plain(inspect.cleandoc(value.__doc__).split("\n\n")[0].replace("`", ""))
            assert summary in sections[name], f"{name}'s docstring is not shown"
        else:  # a constant: Python keeps no docstring for it; its value is shown
            assert repr(value) in sections[name]
