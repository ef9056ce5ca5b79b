# syntax=docker/dockerfile:1
# The job as an image: TensorFlow's GPU image (CUDA, cuDNN) + requirements.txt + job/ and models/.
#
#   docker build -t rotnet-job .
#   docker run --rm --gpus all --user "$(id -u):$(id -g)" --stop-timeout 120 \
#       -v "$PWD/data:/data:ro" -v "$PWD/runs:/runs" -v rotnet-cache:/home/job/.cache/rotnet-job rotnet-job \
#       run --data /data/tiny-imagenet-200.zip --output /runs/t4 --config t4
#   docker run --rm rotnet-job                 # --help
# (README.md, "Launching on a cluster": why --user and --stop-timeout, and gs:// credentials.)
#
# The base tag is the tensorflow version pinned in requirements.txt (tests/unit/test_container.py checks
# that they agree): change both together. It is pinned by tag, not yet by digest: the digest could not be
# looked up where this file was written (no registry access), and none is written here unverified. To pin
# it, append the digest that `docker buildx imagetools inspect tensorflow/tensorflow:2.21.0-gpu` prints
# ("Digest: sha256:…") as `FROM tensorflow/tensorflow:2.21.0-gpu@sha256:…` (the test accepts that form).
FROM tensorflow/tensorflow:2.21.0-gpu

# OCI annotations (`docker inspect`, registries): what the image is and what it is built on.
LABEL org.opencontainers.image.title="rotnet-job" \
      org.opencontainers.image.description="Self-supervised rotation pretraining of MobileNetV2 on Tiny ImageNet, then fish-vs-duck transfer: python -m job" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.base.name="docker.io/tensorflow/tensorflow:2.21.0-gpu"

# HOME is fixed so that `--user "$(id -u):$(id -g)"` (any UID, not in /etc/passwd) finds the same home and
# data.cache_dir (~/.cache/rotnet-job) as the image's own user.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    TF_CPP_MIN_LOG_LEVEL=2 \
    HOME=/home/job

WORKDIR /app

# tcmalloc: the job re-executes itself under it (job/allocator.py); glibc malloc makes CPU-side steps slow.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libtcmalloc-minimal4 \
 && rm -rf /var/lib/apt/lists/*

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt ./
RUN python -c "import sys; assert sys.version_info >= (3, 11), 'the job needs Python 3.11+: ' + sys.version" \
 && python -m pip install --no-cache-dir -r requirements.txt

# An unprivileged user, and its data cache (data.cache_dir = ~/.cache/rotnet-job) made here, owned by it: a
# named volume mounted there starts as a copy of this directory (owner and mode), not as root's empty one.
# The home and the cache are also writable by any other UID (sticky, as /tmp), for `docker run --user`.
RUN groupadd --gid 10001 job \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/job --shell /usr/sbin/nologin job \
 && install -d -o 10001 -g 10001 -m 1777 /home/job/.cache /home/job/.cache/rotnet-job \
 && chmod 1777 /home/job

COPY job/ job/
COPY models/ models/

USER 10001:10001
ENTRYPOINT ["python", "-m", "job"]
CMD ["--help"]
