"""Build the API reference of `early_exit` from its docstrings, as HTML pages made by pdoc.

    python docs/build_api.py [OUTPUT]    # default: docs/api (`make docs`); open OUTPUT/index.html

It documents the package (the names in `early_exit.__all__`) and every public module under it. A module that does
not import stops the build; anything else pdoc warns about is printed and fails it too, except the known harmless
warnings (`KNOWN_HARMLESS`). `tests/test_docs.py` builds the reference the same way, so it cannot rot.
"""

from __future__ import annotations

import argparse
import pkgutil
import warnings
from pathlib import Path

#: Warnings about transformers' annotations, not ours (each: the parts that all appear in it). pdoc reads the
#: annotations that transformers writes into a config subclass's generated `__init__` in our module, where their
#: typing names (`Literal`) are not imported; and from 5.24 `PreTrainedModel.kernels_mode`, typed with the optional
#: `kernels` package under `TYPE_CHECKING`, which the model inherits. The pages still show both as written.
KNOWN_HARMLESS = (
    ("Error parsing type annotation", "EarlyExitConfig.__init__"),
    ("type annotation", "EarlyExitForCausalLM.kernels_mode"),
)


def public_modules() -> list[str]:
    """`early_exit` and every module under it whose dotted name has no part starting with an underscore."""
    import early_exit

    found = (module.name for module in pkgutil.walk_packages(early_exit.__path__, "early_exit."))
    return ["early_exit", *(name for name in found if not any(part.startswith("_") for part in name.split(".")))]


def build_api_reference(output: Path) -> list[str]:
    """Write the reference to `output` (`index.html`, then one page per module, e.g. `early_exit/training.html`).

    Returns:
        pdoc's warnings, less the known harmless ones: an empty list means a clean build.

    Raises:
        RuntimeError: a module does not import (pdoc's error names it).
    """
    import pdoc
    import pdoc.render

    # Google style is how the docstrings are written; without the source view, a docstring pdoc fails to render
    # cannot hide behind the source that contains it.
    pdoc.render.configure(docformat="google", show_source=False, footer_text="early-exit")
    modules = public_modules()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*modules, output_directory=Path(output))
    # Only pdoc's own warnings: libraries imported on the way may warn about themselves.
    messages = [str(warning.message) for warning in caught if "pdoc" in Path(warning.filename).parts]
    return [
        message
        for message in messages
        if not any(all(part in message for part in harmless) for harmless in KNOWN_HARMLESS)
    ]


def main(argv: list[str] | None = None) -> None:
    """Build the reference into the folder given (default `docs/api` beside this script); exit 1 on warnings."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", nargs="?", type=Path, default=Path(__file__).resolve().parent / "api")
    args = parser.parse_args(argv)
    problems = build_api_reference(args.output)
    for problem in problems:
        print(f"warning: {problem}")
    if problems:
        raise SystemExit(f"The API reference built with {len(problems)} warning(s); see above.")
    print(f"API reference written to {args.output / 'index.html'}")


if __name__ == "__main__":
    main()
