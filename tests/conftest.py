"""Test-suite settings."""

import torch

# The test models are tiny: with several intra-op threads they spend their time synchronising threads, which a
# busy CPU makes many times slower (8 ms against 0.04 ms for a tiny matmul was measured here). One thread is faster.
torch.set_num_threads(1)
