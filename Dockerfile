# The vendor: `vendor-api serve` behind a /readyz healthcheck, as a non-root user.
#
#   docker build -t vl2v-vendor:cpu .                       # CPU torch (default, ~1 GB smaller)
#   docker build -t vl2v-vendor:cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#
# Volumes: /data (VENDOR_DATA_DIR: the demo teacher, an embedded Redis when REDIS_URL is unset)
# and /models (Hugging Face / torch caches, and weights files named by VENDOR_TEACHER).
FROM python:3.11-slim

# torch comes from its own index so the default image carries CPU wheels, not ~3 GB of CUDA
# libraries; the package install below then finds torch already satisfied.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/vendor vendor \
    && mkdir -p /data /models \
    && chown vendor:vendor /data /models

# The offline demo teacher (served when VENDOR_TEACHER is empty) is built from these Debian packages.
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist fonts-noto-color-emoji \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.4" "torchvision>=0.19"

# Installed by name from the copied tree: pip refuses a tree whose project name differs, so a
# rename in pyproject.toml breaks the build here instead of shipping a half-installed image.
COPY . /tmp/src
RUN pip install "vl2v-blackbox @ file:///tmp/src" \
    && rm -rf /tmp/src \
    && vendor-api --help > /dev/null

# Named volumes take their owner from these directories on first mount, so the non-root user
# can write the demo teacher and the model caches.
ENV VENDOR_DATA_DIR=/data \
    HF_HOME=/models/huggingface \
    TORCH_HOME=/models/torch \
    HOME=/home/vendor
VOLUME ["/data", "/models"]

USER vendor
WORKDIR /home/vendor
EXPOSE 8000

# Ready means a real forward pass and a Redis ping succeeded; a big teacher can take minutes to
# load (or download) before the port opens, hence the long start period. Slim images have no
# curl: the probe is Python's own urllib (which raises, so exits non-zero, on a 503).
HEALTHCHECK --interval=30s --timeout=25s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=20)"]

CMD ["vendor-api", "serve", "--host", "0.0.0.0", "--port", "8000"]
