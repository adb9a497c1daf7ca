"""Run under accelerate launch: each rank asks run_lock.hold for the output_dir in argv[1] and prints what it got
as one JSON line ({"rank": r, "busy": the one-line error or null})."""
import json
import sys
from pathlib import Path

from accelerate import Accelerator

from cityseg.distributed.run_lock import OutputDirBusy, hold


def main() -> None:
    accelerator = Accelerator(cpu=True)
    try:
        hold(Path(sys.argv[1]), accelerator)
        busy = None
    except OutputDirBusy as err:
        busy = str(err)
    print(json.dumps({"rank": accelerator.process_index, "busy": busy}), flush=True)
    accelerator.end_training()


if __name__ == "__main__":
    main()
