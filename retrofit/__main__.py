"""`python -m retrofit`: the `retrofit` command (so `accelerate launch -m retrofit train RECIPE.yaml` works)."""

from retrofit.cli import main

raise SystemExit(main())
