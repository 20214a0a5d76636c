"""``python -m pipefarm``: the command line."""

from .cli import main

main()
