"""FLoRA Serve: one code model, thousands of tenants, each token with its own low-rank adapter."""

__version__ = "0.1.0"
