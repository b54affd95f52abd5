# The FLoRA Serve platform image: the official Ray image (the Ray that pyproject.toml pins and
# the KubeRay manifests' rayVersion name) with this project installed. See docs/kubernetes.md.
#
#   CPU (default; k8s/overlays/cpu-demo):
#     docker build -t flora-serve:0.1.0-cpu .
#   GPU (k8s/overlays/gpu): the -gpu Ray image, and torch from PyPI, whose Linux wheel is the
#   CUDA build with its CUDA libraries bundled:
#     docker build --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu \
#         --build-arg TORCH_INDEX_URL= -t registry.example.com/flora-serve:0.1.0-gpu .
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311
FROM ${RAY_IMAGE}

# Where torch comes from: the CPU wheels by default (PyPI's Linux wheel would pull multi-GB CUDA
# libraries into a CPU image), PyPI when empty. Same pin as pyproject.toml and the Makefile.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

COPY --chown=ray:users pyproject.toml README.md /tmp/flora-src/
COPY --chown=ray:users platform /tmp/flora-src/platform
COPY --chown=ray:users adapter_registry /tmp/flora-src/adapter_registry
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==2.13.0"; \
    fi \
    && pip install --no-cache-dir /tmp/flora-src \
    && rm -rf /tmp/flora-src \
    && flora --version \
    && python -c "import flora.serve.app, adapter_registry.api"
# KubeRay replaces the command with `ray start …`; Serve imports flora.serve.app:build_app.
