"""``python -m metaunlearn`` — the command line, also under launchers: ``torchrun -m metaunlearn unlearn ...``,
``accelerate launch -m metaunlearn unlearn ...``."""

from metaunlearn.cli import main

if __name__ == "__main__":
    main()
