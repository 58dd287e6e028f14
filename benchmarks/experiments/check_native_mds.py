#!/usr/bin/env python3
"""Check that experiments/native_mds.py writes byte-identical files to streaming's MDSWriter.

    python benchmarks/experiments/check_native_mds.py
"""

import filecmp
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from native_mds import MDSWriter as Native  # noqa: E402
from streaming import MDSWriter as Streaming  # noqa: E402

COLUMNS = {"jpg": "jpeg", "caption": "str", "width": "int32", "height": "int32", "original_width": "int32",
           "original_height": "int32", "key": "str", "image_id": "int64", "url": "str"}


def main() -> None:
    rng = random.Random(0)
    rows = [
        {"jpg": rng.randbytes(rng.randint(100, 50_000)), "caption": "a caption é ✓ " * rng.randint(0, 20), "width": rng.randint(1, 4000),
         "height": rng.randint(1, 4000), "original_width": 5, "original_height": 6, "key": f"{i:09d}", "image_id": 10**11 + i,
         "url": f"http://x/{i}"}
        for i in range(2000)
    ]
    d = tempfile.mkdtemp()
    for name, writer_cls in (("native", Native), ("streaming", Streaming)):
        w = writer_cls(out=f"{d}/{name}", columns=COLUMNS, compression=None, hashes=["xxh64"], size_limit=1 << 22)
        for r in rows:
            w.write(r)
        w.finish()
    a, b = sorted(os.listdir(f"{d}/native")), sorted(os.listdir(f"{d}/streaming"))
    same = a == b and all(filecmp.cmp(f"{d}/native/{x}", f"{d}/streaming/{x}", shallow=False) for x in a)
    print(f"{len(a)} files, identical: {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
