"""``python -m trainfer`` (and ``torchrun -m trainfer``) runs the command line."""

from trainfer.cli import main

if __name__ == "__main__":
    main()
