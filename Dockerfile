# syntax=docker/dockerfile:1
# The job as an image: TensorFlow's GPU image (CUDA, cuDNN) + requirements.txt + job/ and models/.
#
#   docker build -t rotnet-job .
#   docker run --rm --gpus all -v "$PWD/data:/data" -v "$PWD/runs:/runs" rotnet-job \
#       run --data /data/tiny-imagenet-200.zip --output /runs/t4 --config t4
#   docker run --rm rotnet-job                 # --help
#
# The base tag is the tensorflow version pinned in requirements.txt (tests/unit/test_container.py checks
# that they agree): change both together.
FROM tensorflow/tensorflow:2.21.0-gpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    TF_CPP_MIN_LOG_LEVEL=2

WORKDIR /app

# tcmalloc: the job re-executes itself under it (job/allocator.py); glibc malloc makes CPU-side steps slow.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libtcmalloc-minimal4 \
 && rm -rf /var/lib/apt/lists/*

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt ./
RUN python -c "import sys; assert sys.version_info >= (3, 11), 'the job needs Python 3.11+: ' + sys.version" \
 && python -m pip install --no-cache-dir -r requirements.txt

# An unprivileged user; its home holds the data cache (data.cache_dir = ~/.cache/rotnet-job).
RUN groupadd --gid 10001 job \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin job

COPY job/ job/
COPY models/ models/

USER 10001:10001
ENTRYPOINT ["python", "-m", "job"]
CMD ["--help"]
