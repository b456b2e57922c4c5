"""Fused Triton kernels (installed as fastfocal.kernels). Each op file holds the @triton.jit
kernel, a launcher accepting `out=`, and a pure-PyTorch `<op>_ref`."""

# every module with launchers (what the launch counter and the sm_90 compile check wrap)
KERNEL_MODULES = ("attention", "bsq", "convnext", "epilogue", "focal_context", "linear", "modulate", "norm", "status")
