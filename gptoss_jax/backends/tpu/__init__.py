"""The TPU backend: Pallas kernels (lowered through Mosaic) that keep the experts in MXFP4.

mxfp4_matmul.py  the grouped matmul of rows sorted by expert against packed MXFP4 experts, decoding
                 each weight tile in VMEM (forward, and the gradient with respect to the rows).

The kernels run on TPU, or anywhere in Pallas' interpret mode (`Runtime(..., interpret=True)`, what
the tests use on the CPU). gptoss_jax/runtime.py decides when they run.
"""
