"""The accelerators this project knows, from their datasheets: one table that train.py's MFU, the planner
(tools/plan.py) and the roofline (tools/roofline.py) all read. No torch at import."""

GPUS_PER_NODE = 8  # a node's GPUs: the planner keeps a tp group inside one; the roofline sends dp over IB past it

# name: dense peak TFLOP/s by dtype (fp32: the CUDA-core rate; Volta has no bf16), memory (GB); where the roofline
# prices the GPU also hbm (GB/s), nvlink (GB/s one direction per GPU, what NCCL's bus bandwidth is measured against),
# ib (GB/s per GPU, one NIC each) and sms (streaming multiprocessors). The first name contained in a device's name
# wins (accelerator), so specific names come first.
ACCELERATORS = [
    ("H100 PCIe", dict(bf16=756, fp16=756, fp32=51, mem_gb=80)),
    ("H100 NVL", dict(bf16=835, fp16=835, fp32=60, mem_gb=80)),
    # H200: H100 SXM's compute, 4.8 TB/s HBM3e, NVLink 900 GB/s both ways; one ConnectX-7 NDR400 (50 GB/s) per GPU
    ("H200", dict(bf16=989, fp16=989, fp32=67, mem_gb=141, hbm=4800, nvlink=450, ib=50, sms=132)),
    # H100 SXM5: 3.35 TB/s HBM3, NVLink 900 GB/s both ways; DGX H100: one NDR400 per GPU
    ("H100", dict(bf16=989, fp16=989, fp32=67, mem_gb=80, hbm=3350, nvlink=450, ib=50, sms=132)),
    ("H800", dict(bf16=989, fp16=989, fp32=67, mem_gb=80)),
    # A100: 1,555 GB/s (40GB) / 2,039 GB/s (80GB SXM), NVLink 600 GB/s both ways; DGX A100: one HDR200 (25 GB/s)
    ("A100-40GB", dict(bf16=312, fp16=312, fp32=19.5, mem_gb=40, hbm=1555, nvlink=300, ib=25, sms=108)),
    ("A100", dict(bf16=312, fp16=312, fp32=19.5, mem_gb=80, hbm=2039, nvlink=300, ib=25, sms=108)),
    ("A800", dict(bf16=312, fp16=312, fp32=19.5, mem_gb=80)),
    ("L40S", dict(bf16=362, fp16=362, fp32=91.6, mem_gb=48)),
    # V100 SXM2: 900 GB/s HBM2, NVLink 300 GB/s both ways; DGX-2 class nodes: EDR/HDR100, 12.5 GB/s per GPU
    ("V100-32GB", dict(fp16=125, fp32=15.7, mem_gb=32, hbm=900, nvlink=150, ib=12.5, sms=80)),
    ("V100", dict(fp16=125, fp32=15.7, mem_gb=16)),
]


def accelerator(name):
    """ACCELERATORS' figures for a device's name ("H100", "NVIDIA A100-SXM4-80GB"): a new dict, or None."""
    return next((dict(row) for key, row in ACCELERATORS if key.lower() in name.lower()), None)


def peak_flops(cfg, device):
    """Peak FLOP/s of one device for cfg.dtype: --peak_tflops, else the table, else None (CPU, unknown)."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    import torch  # here, not at the top: the planner allocates nothing and needs no GPU
    peak = (accelerator(torch.cuda.get_device_name(device)) or {}).get(cfg.dtype)
    return peak * 1e12 if peak else None
