"""Judge configuration (pydantic v2) and its YAML loader.

The config never holds an API key: it names the environment variable that does
(``api_key_env``). Validation errors are re-raised naming the offending field but *without* the
offending value, so a key pasted into the wrong field cannot leak through an error message.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class MissingApiKeyError(RuntimeError):
    """The environment variable named by ``api_key_env`` is unset or empty."""


class JudgeConfigError(ValueError):
    """A judge config file is invalid; the message names the field, never its value."""


class RetryPolicy(BaseModel):
    """How failed requests are retried."""

    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(4, ge=1, description="Attempts per sample for 5xx, timeouts and connection errors (first try included).")
    parse_retries: int = Field(2, ge=0, description="Extra attempts when the reply arrives but does not parse against the rubric schema.")
    backoff_base_s: float = Field(1.0, gt=0, description="First backoff delay; doubles on each further failure.")
    backoff_max_s: float = Field(60.0, gt=0, description="Upper bound of one backoff delay.")
    jitter: float = Field(0.5, ge=0, le=1, description="Fraction of the delay randomised away (0 = none, 1 = full jitter); de-synchronises workers.")
    max_retry_after_s: float = Field(300.0, gt=0, description="Longest Retry-After honoured after a 429; longer values are clipped.")
    sample_deadline_s: float = Field(1800.0, gt=0, description="Total time one sample may spend (waits included) before it is masked.")


class CircuitBreakerConfig(BaseModel):
    """Stops a worker hammering an endpoint that keeps failing."""

    model_config = ConfigDict(extra="forbid")

    failure_threshold: int = Field(5, ge=1, description="Consecutive transport failures (5xx, timeout, connection) that open the breaker.")
    reset_after_s: float = Field(30.0, gt=0, description="How long the breaker stays open before one probe request is let through.")


class WorkerPoolConfig(BaseModel):
    """Ray judge-worker pool, scaled by the driver from the backlog."""

    model_config = ConfigDict(extra="forbid")

    min_workers: int = Field(1, ge=1, description="Workers kept alive even when idle.")
    max_workers: int = Field(4, ge=1, description="Upper bound on workers however large the backlog.")
    target_backlog_per_worker: int = Field(32, ge=1, description="Stories one worker holds at once; also the backlog per worker that triggers scaling up (desired = ceil(backlog / this)).")
    chunk_size: int = Field(8, ge=1, description="Unused since stories go to workers one by one (no chunk barrier); accepted so older configs still load.")
    scale_down_idle_s: float = Field(60.0, ge=0, description="A worker above min_workers idle this long is removed.")
    num_cpus: float = Field(0.25, ge=0, description="Ray CPUs per worker (judge work is I/O bound).")
    resources: dict[str, float] = Field(default_factory=dict, description="Extra Ray resources per worker, e.g. {judge_node: 0.01} to land on the judge worker group in cluster/judge_workers.yaml.")
    max_resubmits: int = Field(2, ge=0, description="Times a story is resubmitted after its worker dies before it is masked.")

    @model_validator(mode="after")
    def _bounds(self) -> "WorkerPoolConfig":
        if self.max_workers < self.min_workers:
            raise ValueError("max_workers must be >= min_workers")
        return self


class JudgeConfig(BaseModel):
    """One LLM judge endpoint (OpenAI-compatible ``/chat/completions``) and its limits."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("judge", pattern=r"^[A-Za-z0-9_.-]+$", description="Label for logs/metrics; also names the cluster-wide limiter actor.")
    base_url: str = Field(..., description="Endpoint base URL; requests go to <base_url>/chat/completions. No credentials or query string.")
    model: str = Field(..., min_length=1, description="Model name sent in the request body.")
    api_key_env: str | None = Field(None, description="Name of the environment variable holding the API key (None: no auth, e.g. a local vllm serve).")
    temperature: float = Field(0.2, ge=0, le=2, description="Sampling temperature of the judge (recipe B uses 0.2).")
    max_output_tokens: int = Field(1024, ge=16, description="max_tokens for the judge reply; also reserved against the TPM budget.")
    response_format: Literal["json_object", "none"] = Field("json_object", description="Ask the endpoint for JSON mode; 'none' for endpoints without it.")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="Extra request-body fields (e.g. reasoning_effort, service_tier).")
    requests_per_minute: float = Field(60.0, gt=0, description="Cluster-wide request budget per minute (all workers together).")
    tokens_per_minute: float | None = Field(None, gt=0, description="Cluster-wide token budget per minute (input + reserved output); None = unlimited.")
    rate_window_s: float = Field(60.0, gt=0, description="Sliding window over which the per-minute budgets are enforced (budget scales by window/60); shorter = smoother.")
    window_margin_s: float = Field(0.25, ge=0, description="Extra window length on top of the limiter's own transit accounting (a request counts from its permit until W after its response), for endpoints that count in some other way.")
    max_concurrency: int = Field(4, ge=1, description="Cluster-wide cap on requests in flight.")
    timeout_s: float = Field(120.0, gt=0, description="Total time allowed for one HTTP request (connect to last byte).")
    connect_timeout_s: float = Field(10.0, gt=0, description="Time allowed to open a connection.")
    chars_per_token: float = Field(4.0, gt=0, description="Used to estimate input tokens before a request (reconciled with usage after).")
    price_input_per_1m: float = Field(0.0, ge=0, description="USD per 1M input tokens, for the cost metric.")
    price_output_per_1m: float = Field(0.0, ge=0, description="USD per 1M output tokens, for the cost metric.")
    pause_cluster_on_429: bool = Field(False, description="On every 429, pause every worker (via the shared limiter) for its Retry-After, not only the refused request. Off: only what the 429's x-ratelimit-* headers say about the whole quota reaches the other workers.")
    retry: RetryPolicy = Field(default_factory=RetryPolicy, description="Retry and backoff policy.")
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig, description="Circuit breaker settings.")
    workers: WorkerPoolConfig = Field(default_factory=WorkerPoolConfig, description="Ray worker pool and autoscaling.")

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL")
        if parts.username or parts.password or parts.query:
            raise ValueError("must not carry credentials or a query string (keys come from api_key_env)")
        return v.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.match(v):
            raise ValueError("must be the NAME of an environment variable, not a key")
        return v

    def api_key(self) -> str | None:
        """Read the key from the environment; raise naming the variable if it is missing."""
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise MissingApiKeyError(f"judge '{self.name}': environment variable {self.api_key_env} is not set")
        return key


def _describe(e: ValidationError) -> str:
    # Deliberately omit `input`: the bad value could be a secret pasted into the wrong field.
    return "; ".join(f"field '{'.'.join(str(p) for p in err['loc']) or '<root>'}': {err['msg']}" for err in e.errors())


def judge_config_from_dict(data: dict[str, Any], source: str = "<dict>") -> JudgeConfig:
    """Validate a mapping into a :class:`JudgeConfig`, raising :class:`JudgeConfigError`."""
    try:
        return JudgeConfig.model_validate(data)
    except ValidationError as e:
        raise JudgeConfigError(f"{source}: {_describe(e)}") from None


def load_judge_config(path: str | Path) -> JudgeConfig:
    """Read a judge YAML file (the whole file, or its top-level ``judge:`` mapping)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise JudgeConfigError(f"{path}: expected a mapping at the top level")
    if set(data) == {"judge"}:
        data = data["judge"]
    return judge_config_from_dict(data, str(path))
