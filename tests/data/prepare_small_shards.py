"""Test helper run under `accelerate launch`: `cityseg prepare` with images shards of a few samples, so that every
rank owns shards on a tiny dataset; writes <record_dir>/rank<R>.json listing the (shard file, slot) it wrote.

usage: prepare_small_shards.py RECORD_DIR SAMPLES_PER_SHARD HEIGHT WIDTH -- <cityseg prepare arguments>
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from cityseg.cli import main as cityseg_main
from cityseg.data import cache


def main() -> int:
    record_dir, per_shard, height, width = Path(sys.argv[1]), *map(int, sys.argv[2:5])
    prepare_args = sys.argv[sys.argv.index("--") + 1:]
    cache.SHARD_BYTES = per_shard * height * width * 3  # the 1 GiB production limit, scaled to 64x32 images
    written = []
    write_sample = cache._write_sample

    def recorded(job):  # runs in this process (--workers 1): the real write, noted
        written.append([Path(job[4]).name, job[6]])
        return write_sample(job)

    cache._write_sample = recorded
    code = cityseg_main(["prepare", *prepare_args, "--workers", "1"])
    record_dir.mkdir(parents=True, exist_ok=True)
    (record_dir / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(written))
    return code


if __name__ == "__main__":
    sys.exit(main())
