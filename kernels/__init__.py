"""Attention kernels (Triton) and their PyTorch references; knows nothing of models."""
