# Stand-in for python:3.11.7-slim-bookworm (the operator and trainer images' base) where no registry
# can be reached: Debian bookworm's own CPython on the debootstrap base images.sh imports. What
# differs from the official image, and why it does not matter to the project's Dockerfiles:
#   - CPython 3.11.2 from Debian, not 3.11.7 built from source: the locks are for 3.11, any patch;
#   - `python` and `pip` are /usr/bin's (python-is-python3, python3-pip), not /usr/local/bin's:
#     the Dockerfiles call them by name;
#   - pip installs into /usr/local/lib/python3.11/dist-packages (Debian's layout, on sys.path), and
#     PIP_BREAK_SYSTEM_PACKAGES=1 lets it past Debian's PEP 668 marker, as the official image has none;
#   - it trusts the CAs of the building machine's /usr/local/share/ca-certificates (images.sh puts
#     them in the build context): where the registries are reached through a TLS-inspecting proxy,
#     the project's builds on this base (pip) must trust it. PIP_CERT points pip at that store.
ARG DEBIAN_IMAGE=deeptune.local/debian:bookworm
FROM ${DEBIAN_IMAGE}
COPY ca-certificates/ /usr/local/share/ca-certificates/
# Unpinned: the packages are the ones of the debootstrap snapshot's suite (bookworm), whatever its point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip python-is-python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && update-ca-certificates
ENV LANG=C.UTF-8 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
