"""Quantization: weights stored in fewer bits than they were trained in."""
