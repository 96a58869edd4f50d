"""``python -m d3ip_cli`` (used by ``torchrun -m d3ip_cli``)."""

from d3ip_cli.cli import main

if __name__ == "__main__":
    main()
