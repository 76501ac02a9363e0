"""The fuzz tests' seed: ``FP4C_FUZZ_SEED=<seed>`` repeats a run, else each run draws a fresh one."""

import os


def fuzz_seed() -> int:
    return int(os.environ.get("FP4C_FUZZ_SEED") or int.from_bytes(os.urandom(4), "little"))
