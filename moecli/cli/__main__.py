"""``python -m moecli.cli``: the ``moe`` command."""

from moecli.cli.app import main

main()
