# raylm on the official Ray image: RAY_BASE_IMAGE of cluster/versions.env, the one place that
# pins the Ray version (pyproject.toml's pin and the cluster manifests follow it; tested).
#   docker build -t raylm .                                   # GPU image (CUDA torch)
#   docker build --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu -t raylm:cpu .
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

WORKDIR /home/ray/raylm
# Dependencies first, so code changes do not reinstall torch.
COPY --chown=ray:users pyproject.toml README.md ./
# The float8 extra (torchao) is small and lets GPU runs use train.float8=true; the export
# extra (safetensors, gguf) lets a job run `raylm export` where the run is.
RUN mkdir raylm && touch raylm/__init__.py && pip install --no-cache-dir '.[float8,export]' && pip uninstall -y raylm
COPY --chown=ray:users raylm ./raylm
COPY --chown=ray:users jobs ./jobs
RUN pip install --no-cache-dir --no-deps .

# Ray's own entrypoint stays in charge (ray start for cluster nodes, or a job's command).
CMD ["raylm", "--help"]
