# The cluster image: the project and its pinned dependencies, and the system packages the
# filters (PyEnchant: libenchant, an en_US dictionary) and METEOR (Java) need.
#   docker build -t csmn:0.1.0 .        (tag by the version in pyproject.toml, never :latest)
FROM python:3.11.7-slim-bookworm

RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        libenchant-2-2 hunspell-en-us default-jre-headless rsync openssh-client \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY csmn ./csmn
COPY schemas ./schemas
COPY jobs ./jobs
COPY cluster ./cluster
# pyproject.toml pins every direct dependency to an exact version. Editable, because the
# Arrow schemas live beside the package (schemas/), not inside it.
RUN pip install --no-cache-dir -e .

RUN useradd --create-home ray
USER ray
# The cluster launcher mounts ~/.ray/auth_token at the image's HOME: without it, /root.
ENV HOME=/home/ray
