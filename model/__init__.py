"""The BLA language model."""
