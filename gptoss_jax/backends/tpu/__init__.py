"""The TPU backend: Pallas kernels (lowered through Mosaic) that keep the experts in MXFP4.

expert_form.py   the TPU form of MXFP4 experts (the checkpoint's bytes, one expert's tile a plain block).
mxfp4_matmul.py  grouped matmuls of rows against packed MXFP4 experts, decoding each weight tile in
                 VMEM (forward, and the gradient with respect to the rows): rows sorted by expert, or
                 a decode batch's rows as they come.
attention.py     attention with sinks (splash for prefill and training, a decode kernel).

The kernels run on TPU, or anywhere in Pallas' interpret mode (`Runtime(..., interpret=True)`, what
the tests use on the CPU). gptoss_jax/runtime.py decides when they run.
"""
