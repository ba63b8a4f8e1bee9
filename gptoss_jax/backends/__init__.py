"""Kernels per platform, plugged into the model's products, expert algorithms and attention.

cpu/  C++ kernels called through XLA's FFI (MXFP4 experts, bf16 products), and the layer stacks they
      read in place. tpu/ and gpu/ (Pallas) go beside it: a backend exposes functions with the same
      meaning as the XLA paths in gptoss_jax/experts and gptoss_jax/nn, and gptoss_jax/runtime.py
      decides, from the platform of the model's devices, when they run.
"""
