"""Model families that sleep: one package per architecture, each registering itself with `retrofit.registry`.

This package is the entry point `sleep_retrofit.families` names, so `import retrofit` imports it; a family's
package can also be imported first.
"""

import model_patches.registry  # noqa: F401  (imports, and so registers, every family)
