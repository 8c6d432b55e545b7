"""`python -m agencyfl.cli`."""

from agencyfl.cli import main

if __name__ == "__main__":
    main()
