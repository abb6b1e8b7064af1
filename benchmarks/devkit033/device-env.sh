# Source on the GPU machine after device-install: puts the vLLM 0.33 kit first on the path.
# torch 2.14 preloads the nvidia libraries by walking sys.path for nvidia/<lib>/lib: the kit's
# NCCL 2.30.7 (/tmp/site033/nvidia/nccl) comes first; all other nvidia libraries are the image's.
export PYTHONPATH=${DEVKIT033_SITE:-/tmp/site033}${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
# FlashInfer's sampler would JIT-compile for two minutes on every fresh machine.
export VLLM_USE_FLASHINFER_SAMPLER=0
export TORCH_CUDA_ARCH_LIST=9.0
