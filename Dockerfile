# megatron-minitron for GPU clusters: NVIDIA's PyTorch container brings CUDA, NCCL, PyTorch,
# Transformer Engine and apex; megatron-core is pinned to the version runtime/ was written for.
#   docker build -t megatron-minitron:0.1.0 .
#   docker run --gpus all --ipc=host -v /ckpt:/ckpt megatron-minitron:0.1.0 inspect /ckpt/teacher
#   enroot import -o megatron-minitron.sqsh dockerd://megatron-minitron:0.1.0   # for Slurm + pyxis
#
# Base: nvcr.io/nvidia/pytorch:25.11-py3 (Python 3.12, PyTorch 2.10 pre-release, Transformer Engine 2.9,
# apex): its Transformer Engine is inside the range megatron-core 0.16.1 is tested with
# (transformer-engine>=2.9,<2.12 in its dev extra) and its torch meets megatron-core's torch>=2.6.
# A newer tag needs the same check; the build fails below if an import or the version does not hold.
FROM nvcr.io/nvidia/pytorch:25.11-py3

WORKDIR /workspace/megatron-minitron
COPY . .

# One layer, every requirement pinned (the versions the test suite runs with) and --no-deps, so pip
# never replaces the container's torch, numpy or Transformer Engine; then this package itself.
RUN python -m pip install --no-cache-dir --no-deps \
        megatron-core==0.16.1 sentencepiece==0.2.3 psutil==7.2.2 safetensors==0.8.0 tokenizers==0.23.3 blake3==1.0.11 && \
    python -m pip install --no-cache-dir --no-deps . && \
    python -c "import apex, transformer_engine, megatron.core as mc, megatron_minitron.cli; \
assert mc.__version__ == '0.16.1', mc.__version__" && \
    minitron --help > /dev/null

ENTRYPOINT ["minitron"]
CMD ["--help"]
