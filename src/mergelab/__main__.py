"""``python -m mergelab``: the same command line as the ``mergelab`` script."""

from mergelab.cli import main

main()
