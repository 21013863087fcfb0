"""The web playground: a thin page over a running Triton server (no model code here)."""
