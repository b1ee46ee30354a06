"""Datasets (TFDS builders without TensorFlow), the grain input pipeline and augmentation."""
