# The image the Kubernetes example in docs/scale.md runs: a PyTorch base image (torch and CUDA already
# there) plus this package with its `scale` extra (s3fs for s3:// caches).
# Not built by CI here: no test builds or runs this image. Build and push it yourself:
#   docker build -t your-registry/regmean-pipeline:latest .
#   docker build --build-arg BASE=pytorch/pytorch:TAG -t ... .    # another torch / CUDA pair
ARG BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE}

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/regmean-pipeline
COPY pyproject.toml README.md ./
COPY regmean_pipeline ./regmean_pipeline
COPY stages ./stages
# torch comes from the base image (the package does not pin it, so pip keeps that build).
RUN pip install '.[scale]' && regmean --version

WORKDIR /work
ENTRYPOINT ["regmean"]
CMD ["--help"]
