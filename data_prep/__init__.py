"""Readers of the raw dataset formats, preprocessing, TFDS builders and the synthetic CT world."""
