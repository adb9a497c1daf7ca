"""`python -m cityseg …` / `accelerate launch -m cityseg …`: the same as the `cityseg` command."""
import sys

from cityseg.cli import main

sys.exit(main())
