"""Attention read from the KV cache's codes: the C kernel on the CPU, Triton on CUDA, and which one runs a
decoding step (:mod:`kvquant.kernels.dispatch`)."""
