# One image for every lorafleet service (dispatcher, dashboard, GPU workers).
#
#   docker build -t lorafleet .                                   # torch from PyPI
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu121 -t lorafleet .
#
# Picking torch: on x86-64 Linux, torch from PyPI is a CUDA 12 build, which needs a recent
# NVIDIA driver on the host (see `nvidia-smi`, "CUDA Version"). For an older driver pick a
# matching wheel index (cu118, cu121, cu124 ... at https://download.pytorch.org/whl/), and for
# a CPU-only image use https://download.pytorch.org/whl/cpu (much smaller; 4-bit and 8-bit
# training then need a CUDA worker elsewhere).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LORAFLEET_HOME=/data

ARG TORCH_INDEX_URL=
ARG TORCH_VERSION=
# torch first, on its own layer: it is the big download, and the project does not list it
# (so pip never replaces the build chosen here).
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install "torch${TORCH_VERSION:+==$TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"; \
    else \
        pip install "torch${TORCH_VERSION:+==$TORCH_VERSION}"; \
    fi

WORKDIR /app
COPY pyproject.toml README.md ./
COPY dispatcher ./dispatcher
COPY gpuworker ./gpuworker
COPY dashboard ./dashboard
COPY formats ./formats
RUN pip install ".[worker,gpu]"

RUN mkdir -p /data
VOLUME ["/data"]
EXPOSE 8765
# Each service in docker-compose.yml gives its own command.
CMD ["python", "-m", "dashboard"]
