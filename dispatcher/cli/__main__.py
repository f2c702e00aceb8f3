"""`python -m dispatcher.cli`: the `lorafleet` command."""

from dispatcher.cli import main

if __name__ == "__main__":
    main()
