"""`python -m early_exit_cli`: the `early-exit` command line."""

from . import main

main()
