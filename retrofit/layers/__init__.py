"""Building blocks shared by the model families (attention, Gated DeltaNet, MLP, norms, RoPE)."""
