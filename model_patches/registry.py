"""The families of this package, one line each: importing a family's package registers it with
`retrofit.registry` (and so with transformers' Auto classes)."""

import model_patches.hybrid
import model_patches.jet_nemotron
import model_patches.olmo_hybrid
import model_patches.ouro
import model_patches.qwen3_5
import model_patches.qwen3_next  # noqa: F401
