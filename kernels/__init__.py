"""Fused Triton kernels (installed as fastfocal.kernels). Each op file holds the @triton.jit
kernel, a launcher accepting `out=`, and a pure-PyTorch `<op>_ref`."""
