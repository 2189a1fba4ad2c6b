"""``python -m leaderrun``: the same as the ``leaderrun`` command."""

from leaderrun.cli import main

main()
