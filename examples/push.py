"""Share a heads folder on the Hugging Face Hub: its config, weights, generation config, model card and tokenizer
(never the base model, which the config names).

Needs network access and a token (`hf auth login`, or HF_TOKEN). Without network access it ends with one line that
says why and how to upload the folder later.

    python examples/push.py                                   # my-heads/ to <you>/SmolLM2-135M-Instruct-exits
    python examples/push.py --heads notes-heads --repo-id your-name/notes-heads --private
"""

from __future__ import annotations

import argparse
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The script's options (the module docstring is its description)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=Path, default=Path("my-heads"), help="heads folder to upload (my-heads)")
    parser.add_argument(
        "--repo-id",
        default="SmolLM2-135M-Instruct-exits",
        help="Hub repository, made if missing; without a namespace, under your account (SmolLM2-135M-Instruct-exits)",
    )
    parser.add_argument("--private", action="store_true", help="make a new repository private")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` (default: the command line), upload the heads folder and print the commit's address."""
    args = build_parser().parse_args(argv)
    from early_exit.errors import EarlyExitError  # after parsing, so that --help and mistakes answer at once
    from early_exit.hub import upload_heads

    try:
        url = upload_heads(args.heads, args.repo_id, private=args.private or None)
    except EarlyExitError as error:
        raise SystemExit(f"push.py: {error}") from error
    print(f"heads uploaded: {url}")


if __name__ == "__main__":
    main()
