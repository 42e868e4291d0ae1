"""Code that `save_pretrained` copies into every heads folder (as `modeling_early_exit.py`, named by the `auto_map` of
its `config.json`), so that `AutoConfig` and `AutoModelForCausalLM` load the heads with `trust_remote_code=True` in a
process that never imported `early_exit`.

It holds no model code of its own: it takes the classes from the installed `early_exit` package, so the heads always
run the code of the installed release, and loading them through it gives the very classes `import early_exit` gives.
The import sits in a `try` block, which transformers' `check_imports` skips, so that a missing package is reported
by the message below (the distribution's name, `early-exit`, differs from the module's).
"""

try:
    from early_exit import EarlyExitConfig, EarlyExitForCausalLM
except ModuleNotFoundError as error:
    if error.name != "early_exit":  # the package is there but something it needs is not: that error says what
        raise
    raise ImportError(
        "These are early-exit heads: loading them needs the early-exit package, which is not installed. Install it "
        "with `pip install early-exit`, then load them again."
    ) from error

__all__ = ["EarlyExitConfig", "EarlyExitForCausalLM"]
