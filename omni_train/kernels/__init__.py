"""Compiled elementwise kernels and the compile helper: the bottom layer, imported by parallel/ and models/."""
