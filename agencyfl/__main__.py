"""`python -m agencyfl` runs the `agencyfl` command."""

from agencyfl.cli import main

main()
