#!/usr/bin/env bash
# Prepares a lent GPU machine to run this checkout: source it from the repository root at the start of a command.
#   source benchmarks/gpu_machine.sh && python -m pytest -m gpu tests/
# 1. The GPU kit (../shared/gpu, copied to .gpu/ and carried): Triton 3.7.1, fla, datasets, deepspeed.
# 2. The checkout on PYTHONPATH, and its model families registered: `import retrofit` finds families through the
#    `sleep_retrofit.families` entry point (pyproject.toml), which only installed package metadata declares. The
#    machine cannot build the package offline, so this writes that metadata by hand into the kit's site folder.
# 3. Triton's autotuning cache on, seeded with the results kept in benchmarks/autotune.
source .gpu/setup.sh || return 1 2>/dev/null || exit 1
metadata=/tmp/site/sleep_retrofit-0.1.0.dist-info
mkdir -p "$metadata"
printf 'Metadata-Version: 2.1\nName: sleep-retrofit\nVersion: 0.1.0\n' > "$metadata/METADATA"
printf '[sleep_retrofit.families]\nmodel_patches = model_patches\n' > "$metadata/entry_points.txt"
export PYTHONPATH="$PWD:$PYTHONPATH" TRITON_CACHE_AUTOTUNING=1 PYTHONUNBUFFERED=1
python -m benchmarks.triton_cache seed
