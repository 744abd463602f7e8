# One image for both services: `llm-hub serve` (the bridge, the default) and `llm-hub-gateway`.
# docker-compose.yml runs the architecture; alone: docker run -e LMSTUDIO_URL=... -p 3000:3000 llm-hub
ARG PYTHON_IMAGE=python:3.11-slim

# -- build: the project's wheel, installed with its dependencies into a venv -------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY llm_hub/ llm_hub/
COPY mcp_server/ mcp_server/
COPY gateway/ gateway/
RUN pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv --without-pip /opt/llm-hub \
 && pip --python /opt/llm-hub/bin/python install /dist/*.whl

# -- final: the venv on the same slim base, no build tools, a user without privileges ----------
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 llm-hub \
 && useradd --system --uid 10001 --gid llm-hub --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin llm-hub \
 && mkdir -p /var/log/llm-hub && chown llm-hub:llm-hub /var/log/llm-hub
COPY --from=build /opt/llm-hub /opt/llm-hub
ENV PATH=/opt/llm-hub/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 LLM_HUB_HOST=0.0.0.0
USER 10001:10001
EXPOSE 3000 8080

# /health answers 200 only while the service can work (a bridge: LM Studio reachable; the gateway:
# at least one bridge healthy). Slim has no curl: Python asks. The port is $LLM_HUB_PORT, default
# 3000 (the bridge's); run the gateway with LLM_HUB_PORT=8080, as docker-compose.yml does.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["python", "-c", \
    "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.getenv('LLM_HUB_PORT', '3000'), timeout=4)"]

# Logs are JSON lines on stderr (`docker logs` shows them). With LOG_FILE set, stderr is also
# appended to that file (docker-compose.yml points it into the llm-hub-logs volume). `exec` keeps
# the service itself as the process that receives SIGTERM.
ENTRYPOINT ["/bin/bash", "-c", \
            "if [ -n \"${LOG_FILE:-}\" ]; then exec \"$@\" 2> >(exec tee -a -- \"$LOG_FILE\" >&2); fi; exec \"$@\"", \
            "llm-hub-entrypoint"]
CMD ["llm-hub", "serve"]
