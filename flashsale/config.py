"""Configuration: one frozen dataclass read from the environment (defaults of API.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from flashsale.limits import MAX_QTY_PER_HOLD_LIMIT, MAX_STOCK

DEFAULT_DATA_DIR = ".flashsale"


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from None


def _bounded(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    value = _int(env, name, default)
    if not low <= value <= high:
        raise SystemExit(f"{name} must be between {low} and {high}, got {value}")
    return value


def _optional(env: Mapping[str, str], name: str, high: int) -> int | None:
    """A positive limit, or None when unset."""
    if not env.get(name):
        return None
    return _bounded(env, name, 1, 1, high)


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a number of seconds, got {raw!r}") from None
    if not 0 <= value <= 3600:  # NaN fails this too
        raise SystemExit(f"{name} must be 0 to 3600 seconds, got {raw!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """Everything a process needs to know; tests build it directly."""

    port: int = 8000
    database_url: str = ""
    redis_url: str = ""
    redis_cluster_url: str = ""  # the data plane on a Redis Cluster (workers.planes)
    hold_ttl_seconds: int = 120
    order_payment_ttl_seconds: int = 900
    max_qty_per_hold: int = 10
    default_wait_seconds: float = 5.0
    max_wait_seconds: float = 60.0
    webhook_secret: str | None = None
    admin_token: str | None = None
    # Customers and fairness (API.md): unset means off.
    customer_jwt_secret: str | None = None
    max_qty_per_customer: int | None = None
    rate_limit_per_minute: int | None = None
    batch_size: int = 200
    drain_products: int = 64  # products one drainer applies in one transaction
    worker_metrics_port: int = 0  # 0: workers serve no /metrics of their own
    lease_ms: int = 5000
    # Idempotency keys and queued jobs live this long in Redis. Job results are
    # cached for job_cache_seconds; after that they are read from the database.
    job_ttl_seconds: int = 25 * 3600
    job_cache_seconds: int = 3600
    sweep_interval_seconds: int = 1
    log_json: bool = False
    data_dir: str = DEFAULT_DATA_DIR
    extra: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        data_dir = env.get("FLASHSALE_DATA_DIR") or DEFAULT_DATA_DIR
        return cls(
            port=_int(env, "PORT", 8000),
            database_url=env.get("DATABASE_URL") or f"sqlite:///{data_dir}/flashsale.db",
            redis_url=env.get("REDIS_URL") or "",
            redis_cluster_url=env.get("REDIS_CLUSTER_URL") or "",
            hold_ttl_seconds=_int(env, "HOLD_TTL_SECONDS", 120),
            order_payment_ttl_seconds=_int(env, "ORDER_PAYMENT_TTL_SECONDS", 900),
            max_qty_per_hold=_bounded(env, "MAX_QTY_PER_HOLD", 10, 1, MAX_QTY_PER_HOLD_LIMIT),
            default_wait_seconds=_seconds(env, "DEFAULT_WAIT_SECONDS", 5.0),
            webhook_secret=env.get("WEBHOOK_SECRET") or None,
            admin_token=env.get("ADMIN_TOKEN") or None,
            customer_jwt_secret=env.get("CUSTOMER_JWT_SECRET") or None,
            max_qty_per_customer=_optional(env, "MAX_QTY_PER_CUSTOMER", MAX_STOCK),
            rate_limit_per_minute=_optional(env, "RATE_LIMIT_PER_MINUTE", 1_000_000),
            batch_size=min(max(_int(env, "BATCH_SIZE", 200), 1), 1000),
            drain_products=_bounded(env, "DRAIN_PRODUCTS", 64, 1, 500),
            worker_metrics_port=_bounded(env, "WORKER_METRICS_PORT", 0, 0, 65535),
            lease_ms=_int(env, "DRAIN_LEASE_MS", 5000),
            job_cache_seconds=_int(env, "JOB_CACHE_SECONDS", 3600),
            log_json=(env.get("LOG_FORMAT", "").lower() == "json"),
            data_dir=data_dir,
        )
