"""Floor 1: attention backends, RoPE and KV-store kernels. Imports only torch and triton."""
