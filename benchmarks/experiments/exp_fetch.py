#!/usr/bin/env python3
"""Run bin/fetch with proposed core changes patched in, to measure them before they land.

    python benchmarks/experiments/exp_fetch.py [--native-mds] [--no-trust-env] -- <bin/fetch args>

--native-mds     fastfetch.mds gets the streaming-free MDSWriter of native_mds.py (byte-identical
                 files; checked against streaming's writer), so bin/fetch never imports streaming
                 (and through it torch and transformers)
--no-trust-env   aiohttp.ClientSession(trust_env=False): no netrc lookup and proxy lookup in a
                 thread per request (the benchmark has no proxy, so behaviour is unchanged)

Only the top process is patched; the resize workers are untouched.
"""

import os
import sys


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    argv = sys.argv[1:]
    flags = set()
    while argv and argv[0] != "--":
        flags.add(argv.pop(0))
    if argv and argv[0] == "--":
        argv.pop(0)
    sys.path.insert(0, root)
    if "--native-mds" in flags:
        import types

        sys.path.insert(0, here)
        import native_mds

        fake = types.ModuleType("streaming")
        fake.MDSWriter = native_mds.MDSWriter
        sys.modules["streaming"] = fake
    if "--no-trust-env" in flags:
        import aiohttp

        original = aiohttp.ClientSession.__init__

        def init(self, *a, **kw):
            kw["trust_env"] = False
            original(self, *a, **kw)

        aiohttp.ClientSession.__init__ = init
    from fastfetch.cli import main as fetch_main

    return fetch_main(argv)


if __name__ == "__main__":
    sys.exit(main())
