# genrec CPU image: the gRPC retrieval server over indexes mounted at /app/indexes.
#   docker build -t genrec .
#   docker run -p 50051:50051 -p 9100:9100 -v $PWD/runs/demo/indexes:/app/indexes genrec
# CUDA variant: see docs/deploy.md (a CUDA base image and the torch wheel built for its CUDA version).
# tests/test_deploy.py runs this file's RUN and CMD lines in a fresh virtualenv, so keep them shell lines.
FROM python:3.11-slim

# torch first, from its CPU index: a bare requirement would pull a multi-GB CUDA build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY genrec genrec
COPY encoders encoders
COPY kernels kernels
COPY retrieval retrieval
COPY index index
COPY serving serving
COPY deploy/serve.yaml deploy/serve.yaml

RUN pip install --no-cache-dir ${TORCH_INDEX:+--extra-index-url $TORCH_INDEX} torch==2.13.0
RUN pip install --no-cache-dir .

EXPOSE 50051 9100
ENTRYPOINT ["genrec", "serve"]
CMD ["--config", "deploy/serve.yaml"]
