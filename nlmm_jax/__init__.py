"""NL-MM in JAX/Flax: tri-modal retrieval from Nested Learning blocks."""

__version__ = "0.1.0"
