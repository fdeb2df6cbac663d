# Image for every node of the AWS Ray cluster (cluster/aws.yaml) and for local runs.
#
# One build argument, FLAVOR, picks both the official Ray image and the PyTorch wheel index,
# because both projects name their variants the same way:
#   FLAVOR=cpu    rayproject/ray:<RAY_VERSION>-py311-cpu    + torch from .../whl/cpu    (head, CPU workers)
#   FLAVOR=cu128  rayproject/ray:<RAY_VERSION>-py311-cu128  + torch from .../whl/cu128  (GPU workers)
# so the GPU image's torch is built for the CUDA the Ray image ships. (`-gpu` is only an alias for
# Ray's default CUDA, which moves between releases; name the CUDA explicitly instead.)
#
#   docker build -t imgsearch:cpu .
#   docker build --build-arg FLAVOR=cu128 -t imgsearch:gpu .
#
# RAY_VERSION must equal the Ray version of the laptop that runs `ray up` / `serve deploy`
# (tests/test_dockerfile.py checks it against the installed ray).
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG FLAVOR=cpu

# ---------------------------------------------------------------------------------------------
# builder: resolve and install the project and its dependencies into the ray user's user-site
# (/home/ray/.local), on top of the Python of the Ray image. Only that folder moves on.
# ---------------------------------------------------------------------------------------------
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${FLAVOR} AS builder

ARG FLAVOR
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${FLAVOR}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# The Ray image's ray user (uid 1000, group users); the source folder is made by that user so
# the in-tree build can write to it.
USER 1000:100
WORKDIR /home/ray

# torch first, from the index that matches FLAVOR; `pip install .` then finds it satisfied and
# does not pull PyPI's default (CUDA) build into the CPU image.
RUN mkdir -p /home/ray/src \
    && pip install --no-cache-dir --user "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /home/ray/src

COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 image_search ./image_search
COPY --chown=1000:100 serve_app ./serve_app
COPY --chown=1000:100 index_builder ./index_builder
COPY --chown=1000:100 ui ./ui

# Builds the project's wheel (pure Python, no compiler) and installs it with its dependencies.
# Anything the Ray image already has at a satisfying version (ray itself, numpy, ...) is reused.
RUN pip install --no-cache-dir --user . \
    && python -c "import image_search, serve_app, index_builder, torch, faiss; print('torch', torch.__version__)"

# ---------------------------------------------------------------------------------------------
# final: the plain Ray image plus the installed packages. No sources, no pip cache, no build
# tools added (Ray's cuXX images keep the g++ of their CUDA devel base; the cpu ones have none);
# the ray user (uid 1000) loses the image's passwordless sudo.
# ---------------------------------------------------------------------------------------------
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${FLAVOR}

ARG RAY_VERSION
ARG FLAVOR

LABEL org.opencontainers.image.title="imgsearch" \
      org.opencontainers.image.description="Image-to-image search on Ray Serve (CLIP + FAISS)" \
      imgsearch.ray-version="${RAY_VERSION}" \
      imgsearch.flavor="${FLAVOR}"

USER 0
# The Ray image puts `ray ALL=NOPASSWD: ALL` in /etc/sudoers and ray in the sudo group; a
# non-root user with passwordless sudo is root in all but name. The cluster launcher does not
# need sudo inside the container.
RUN sed -i '/^ray ALL=NOPASSWD: ALL$/d' /etc/sudoers \
    && gpasswd -d ray sudo

# 1000:100 is the image's ray:users (numeric, so any runtime resolves it without /etc/passwd).
USER 1000:100
COPY --from=builder --chown=1000:100 /home/ray/.local /home/ray/.local

ENV PATH=/home/ray/.local/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/ray/.cache/huggingface

WORKDIR /home/ray

EXPOSE 8000
