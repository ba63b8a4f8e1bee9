"""The GPU backend: Pallas kernels (lowered through Triton) that keep the experts in MXFP4.

mxfp4_matmul.py  the grouped matmul of rows sorted by expert against packed MXFP4 experts, decoding
                 each weight chunk in registers (forward, and the gradient with respect to the rows).

They read the checkpoint's own layout (a GPU's arrays are plain row-major), run on NVIDIA GPUs, or
anywhere in Pallas' interpret mode (what the tests use on the CPU). gptoss_jax/runtime.py decides when.
"""
