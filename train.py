"""Entry point for `accelerate launch train.py --config configs/x.yaml [key=value ...]` (or plain python)."""
import sys

from cityseg.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
