# One image for every process type; the command picks the role (see Procfile and
# docker-compose.yml): flashsale web | worker | scheduler | migrate.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8000

WORKDIR /app

# setup.cfg reads README.md for the package's long description.
COPY setup.cfg pyproject.toml README.md ./
COPY flashsale ./flashsale
COPY gateway ./gateway
COPY workers ./workers
COPY models ./models
COPY schedules ./schedules

# pymysql[rsa] adds the cryptography package: MySQL 8's default authentication
# (caching_sha2_password) needs it on a connection without TLS.
RUN pip install . "pymysql[rsa]" \
    && useradd --create-home --uid 10001 flashsale

USER flashsale
EXPOSE 8000
CMD ["flashsale", "web"]
