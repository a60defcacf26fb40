# Stand-in for nvcr.io/nvidia/tritonserver:24.10-py3 (serving-image/Dockerfile's base) where no
# registry can be reached: Ubuntu 22.04 from debootstrap, the official image's OS, with its Python
# 3.10, and Triton server 2.51 from the nvidia-pytriton wheel, laid out where NVIDIA's image has it.
# What differs, and why it does not matter to serving-image/Dockerfile:
#   - the same paths: /opt/tritonserver/bin/tritonserver (on PATH), backends/python
#     (libtriton_python.so, triton_python_backend_utils.py and the stub, here the wheel's stub for
#     Python 3.10) and caches/local; the working directory /opt/tritonserver; the user
#     triton-server, uid and gid 1000;
#   - only the Python backend: no CUDA toolkit, DCGM, TensorRT, ONNX Runtime, PyTorch or vLLM
#     backend (the serving image uses the Python backend alone; its torch brings its own CUDA);
#   - the server's own libraries are the wheel's (nvidia_pytriton.libs), in /opt/tritonserver/lib
#     and found through LD_LIBRARY_PATH;
#   - python3 3.10 and pip are Ubuntu's packages, as in the official image, plus libpython3.10, which
#     the stub links against;
#   - it trusts the CAs of the building machine, as python.Dockerfile does (pip reaches PyPI).
ARG UBUNTU_IMAGE=deeptune.local/ubuntu:jammy
FROM ${UBUNTU_IMAGE}
COPY ca-certificates/ /usr/local/share/ca-certificates/
# Unpinned: the packages of the debootstrap snapshot's suite (jammy), whatever its point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip libpython3.10 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && update-ca-certificates \
 && groupadd --gid 1000 triton-server \
 && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash triton-server
ENV LANG=C.UTF-8 \
    PATH=/opt/tritonserver/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LD_LIBRARY_PATH=/opt/tritonserver/lib \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
# The server out of the wheel (images.sh passes the version requirements.lock pins); zipfile keeps no
# file modes, so the two programs are made executable again.
ARG PYTRITON=nvidia-pytriton==0.7.0
RUN python3 -m pip download --no-deps --only-binary=:all: --dest /tmp/wheel "${PYTRITON}" \
 && python3 -m zipfile -e /tmp/wheel/*.whl /tmp/wheel/files \
 && server=/tmp/wheel/files/pytriton/tritonserver \
 && mkdir -p /opt/tritonserver/lib \
 && cp -a "$server/bin" "$server/backends" "$server/caches" /opt/tritonserver/ \
 && cp "$server/python_backend_stubs/3.10/triton_python_backend_stub" /opt/tritonserver/backends/python/ \
 && cp -a /tmp/wheel/files/nvidia_pytriton.libs/. /opt/tritonserver/lib/ \
 && chmod 755 /opt/tritonserver/bin/tritonserver /opt/tritonserver/backends/python/triton_python_backend_stub \
 && rm -rf /tmp/wheel /opt/tritonserver/backends/python/__pycache__
WORKDIR /opt/tritonserver
