# raylm on the official Ray image: RAY_BASE_IMAGE of cluster/versions.env, the one place that
# pins the Ray version (pyproject.toml's pin and the cluster manifests follow it; tested).
#   docker build -t raylm .                                   # GPU image (CUDA torch)
#   docker build --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu -t raylm:cpu .
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}
# Where a CPU image gets torch: PyPI's Linux x86_64 torch is the CUDA build, gigabytes of
# CUDA libraries a CPU image never loads.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

# The image runs as the ray user (uid 1000, group users), and the build below writes into
# the working directory: made here, as that user, because WORKDIR makes a missing directory
# owned by root under some builders (the classic, non-BuildKit one).
RUN mkdir -p /home/ray/raylm
WORKDIR /home/ray/raylm
# Dependencies first, so code and README changes do not reinstall torch. Only pyproject.toml:
# setuptools reads the readme it names into the metadata, so an empty placeholder stands in
# for it here and the real one comes with the code.
COPY --chown=ray:users pyproject.toml ./
# The float8 extra (torchao) is small and lets GPU runs use train.float8=true; the export
# extra (safetensors, gguf) lets a job run `raylm export` where the run is. On a CPU base
# image (no /usr/local/cuda: Ray's own base-deps image tells them apart the same way) torch
# comes from the CPU index first, with pyproject's pin (tested), and pip keeps it. The
# placeholders and the build's leftovers go: setuptools would reuse build/lib's empty
# raylm/__init__.py, newer than the real one (COPY keeps the files' times).
RUN mkdir raylm && touch raylm/__init__.py README.md \
    && if [ ! -d /usr/local/cuda ]; then \
        pip install --no-cache-dir --index-url "$TORCH_CPU_INDEX" 'torch>=2.13'; fi \
    && pip install --no-cache-dir '.[float8,export]' && pip uninstall -y raylm \
    && rm -rf build raylm.egg-info raylm README.md
COPY --chown=ray:users README.md ./
COPY --chown=ray:users raylm ./raylm
COPY --chown=ray:users jobs ./jobs
RUN pip install --no-cache-dir --no-deps .

# Ray's own entrypoint stays in charge (ray start for cluster nodes, or a job's command).
CMD ["raylm", "--help"]
