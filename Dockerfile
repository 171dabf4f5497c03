# chatpipe services image: one image, one command per service (see compose.yaml).
FROM python:3.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY ingest ingest
COPY processors processors
COPY sinks sinks
COPY chatpipe chatpipe
RUN pip install . && useradd --system --create-home chatpipe && mkdir -p /var/lib/chatpipe \
    && chown chatpipe /var/lib/chatpipe
USER chatpipe
ENV CHATPIPE_STATE_DIR=/var/lib/chatpipe CHATPIPE_LOG_FORMAT=json
# ingest, read API, worker web, sink and reconciler metrics (compose.yaml); secrets come from the
# environment at run time, never from the image (.dockerignore keeps .env out of the build context)
EXPOSE 8080 8081 6066 9108 9109
ENTRYPOINT ["chatpipe"]
