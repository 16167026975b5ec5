"""GPU kernels (Triton) and their plain-PyTorch references.

Modules are imported on use, not here: ``block_sparse`` needs Triton, and tests choose the Triton
interpreter (``TRITON_INTERPRET=1``) before the kernel is defined.
"""
