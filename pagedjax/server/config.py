"""ServerConfig: the HTTP server's limits and timeouts (validated)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    """What one client may ask of the server, and how long anything may take.

    `max_request_bytes`: largest request body (413 beyond). `max_sequences_per_request`:
    prompts x n of one completion request (400 beyond), so no single client queues
    thousands of sequences. `request_read_timeout_s`: a request's headers, and then its
    body, must arrive within it (a half-sent request is closed / answered 408).
    `keep_alive_timeout_s`: an idle keep-alive connection is closed after it.
    `shutdown_timeout_s`: on shutdown, in-flight requests get this long to finish; the rest
    are failed (an error event on streams, 503 otherwise). `trust_request_chat_template`:
    accept a request's own `chat_template` (vLLM's flag; off: 400); such templates render
    in a worker process within `template_timeout_s` and `template_max_chars` characters of
    output, the worker keeping at most `template_cache_size` compiled templates.
    `enable_control_endpoints`: serve /pause, /resume, /sleep, /wake_up, /is_paused and
    /is_sleeping for an RL controller (vLLM's; off: 404), behind the API key when set.
    """

    max_request_bytes: int = 1 << 20
    max_sequences_per_request: int = 256
    request_read_timeout_s: float = 30.0
    keep_alive_timeout_s: float = 5.0
    shutdown_timeout_s: float = 10.0
    trust_request_chat_template: bool = False
    template_timeout_s: float = 5.0
    template_max_chars: int = 1 << 20
    template_cache_size: int = 8
    enable_control_endpoints: bool = False

    def __post_init__(self):
        for name in ("max_request_bytes", "max_sequences_per_request", "template_max_chars",
                     "template_cache_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("request_read_timeout_s", "keep_alive_timeout_s", "shutdown_timeout_s",
                     "template_timeout_s"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not 0 < value < float("inf")):
                raise ValueError(f"{name} must be a positive number of seconds, "
                                 f"got {value!r}")
        for name in ("trust_request_chat_template", "enable_control_endpoints"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
