# hvbridge as a container: a slim Python base, a non-root user, `ENTRYPOINT ["hvbridge"]`.
#
#   docker build -t hvbridge .
#   docker run --device /dev/vsock --security-opt seccomp=vsock-seccomp.json \
#       -v ./routes.toml:/etc/hvbridge/routes.toml:ro -p 2222:2222 hvbridge
#
# docs/operations.md explains /dev/vsock, the seccomp setting AF_VSOCK needs, sidecars and
# Kubernetes. The HEALTHCHECK asks the daemon's own metrics endpoint (`[bridge] metrics`)
# through `hvbridge probe`: healthy means the event loop answers and every route listens.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY hvbridge ./hvbridge
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 hvbridge \
    && useradd --system --uid 10001 --gid hvbridge --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin hvbridge
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels /wheels/hvbridge-*.whl \
    && rm -rf /wheels
COPY configs/container.toml /etc/hvbridge/routes.toml
# The numeric id of the hvbridge user made above (numeric: resolvable by any runtime).
USER 10001:10001
EXPOSE 2222
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=15s --retries=3 \
    CMD ["hvbridge", "probe", "-c", "/etc/hvbridge/routes.toml"]
ENTRYPOINT ["hvbridge"]
CMD ["-c", "/etc/hvbridge/routes.toml"]
