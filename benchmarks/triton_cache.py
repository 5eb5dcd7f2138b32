"""Triton autotuning results that travel, so that a fresh GPU machine skips fla's autotuning for shapes seen before.

On a fresh machine every autotuned fla kernel is compiled and benchmarked in each candidate configuration (3 to 25
per shape class) before the first step: about 4.5 minutes before step 1 of the Rule 110 sweep's three processes on
an H100 (benchmarks/replication/README.md). With `TRITON_CACHE_AUTOTUNING=1`, Triton writes each winner to
`<cache>/<hash>/<kernel>.autotune.json`, the hash covering Triton's version, the GPU target, the kernel source, the
tuning key (the shape class) and the candidates; when that file is there, Triton compiles the winner only.
`benchmarks/autotune/` keeps those files (a few KB each). On the GPU machine:

    export TRITON_CACHE_AUTOTUNING=1
    python -m benchmarks.triton_cache seed                        # before the work (run, replication and
                                                                  # distributed do both themselves)
    python -m benchmarks.triton_cache harvest --out $OUT/autotune.tar   # after it: the new results, to commit
    tar xf autotune.tar -C benchmarks/autotune                   # here

A result only picks one of the kernel's correct configurations, so a stale one costs speed, never correctness. One
tuned while other processes shared the GPU may not be the fastest; harvest from the timing suite's own runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

SEEDS = Path(__file__).resolve().parent / "autotune"
SUFFIX = ".autotune.json"


def triton_cache_dir() -> Path:
    """Where Triton caches compiled kernels: `$TRITON_CACHE_DIR`, else `$TRITON_HOME/.triton/cache` (home)."""
    if os.environ.get("TRITON_CACHE_DIR"):
        return Path(os.environ["TRITON_CACHE_DIR"])
    return Path(os.environ.get("TRITON_HOME") or Path.home()) / ".triton" / "cache"


def autotune_results(root: Path) -> set[str]:
    """The autotuning results under a cache-shaped folder, as `<hash>/<kernel>.autotune.json` paths."""
    return {path.relative_to(root).as_posix() for path in root.glob(f"*/*{SUFFIX}")} if root.is_dir() else set()


def seed(cache: Path, seeds: Path = SEEDS) -> int:
    """Copy the kept results that `cache` lacks into it; returns how many."""
    missing = sorted(autotune_results(seeds) - autotune_results(cache))
    for name in missing:
        (cache / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(seeds / name, cache / name)
    return len(missing)


def harvest(cache: Path, out: Path, seeds: Path = SEEDS) -> int:
    """Write the results in `cache` that are not kept yet to the tar file `out`; returns how many."""
    new = sorted(autotune_results(cache) - autotune_results(seeds))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w") as archive:
        for name in new:
            archive.add(cache / name, arcname=name)
    return len(new)


def use_kept_autotuning() -> None:
    """Turn on Triton's autotuning cache for this process and its children and seed it with the kept results; the
    GPU benchmarks call it first, so that a fresh machine compiles only the kernels' winning configurations."""
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    count = seed(triton_cache_dir())
    print(f"Triton autotuning cache: {count} kept result(s) added ({SEEDS.name}/ -> {triton_cache_dir()})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.triton_cache", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("seed", "harvest"))
    parser.add_argument("--out", type=Path, help="harvest: the tar file to write")
    parser.add_argument("--cache", type=Path, help="the Triton cache (default: $TRITON_CACHE_DIR or ~/.triton/cache)")
    args = parser.parse_args(argv)
    cache = args.cache or triton_cache_dir()
    if args.action == "seed":
        count = seed(cache)
        print(f"seeded {count} autotuning result(s) from {SEEDS} into {cache}")
        if os.environ.get("TRITON_CACHE_AUTOTUNING") != "1":
            print("warning: TRITON_CACHE_AUTOTUNING is not 1, so Triton will not read them", file=sys.stderr)
        return 0
    if args.out is None:
        parser.error("harvest needs --out FILE.tar")
    print(f"harvested {harvest(cache, args.out)} new autotuning result(s) from {cache} into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
