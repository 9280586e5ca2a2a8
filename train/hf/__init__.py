"""The Hugging Face classes of the export format (``bla.train.export`` copies them into every export)."""
