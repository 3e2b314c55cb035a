# syntax=docker/dockerfile:1
# creditd container image. Build:  docker build -t creditd .
# Run:    docker run -p 50051:50051 -e CREDITD_DATABASE_URL=... -e CREDITD_REDIS_URL=... creditd

# --- builder: build the creditd and creditd-client wheels (the client carries the API stubs
# and creditctl), then install both with their dependencies into a venv ---
FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY . .
RUN pip wheel --no-deps -w /wheels ./clients/python . \
 && /opt/venv/bin/pip install /wheels/*.whl

# --- runtime: the venv only, run as an unprivileged user ---
FROM python:3.11-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CREDITD_LISTEN=0.0.0.0:50051
RUN groupadd --system --gid 10001 creditd \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/creditd --create-home creditd
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/creditd
# gRPC API. Prometheus metrics (port 9464) are off unless CREDITD_METRICS_LISTEN is set.
EXPOSE 50051
# Standard grpc.health.v1 check of the whole server at $CREDITD_LISTEN; exits 0 only when SERVING.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-m", "creditd.healthcheck"]
ENTRYPOINT ["creditd"]
CMD ["serve"]
