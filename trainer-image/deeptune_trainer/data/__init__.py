"""The data pipeline: read the user's rows, map them to samples, clean, split and augment them."""
