"""ServerSettings: every limit, timeout and access rule of the HTTP server, in one frozen place.

The defaults are meant to be safe for an unattended server on one machine: a client can cost
the engine at most one bounded request at a time per admission slot, and a socket that says
nothing is closed after a few seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    """Limits, timeouts and access rules of one ``OpenAIServer`` (CLI flags map 1:1).

    ``max_prompt_chars=None`` means ``32 × max_model_len`` characters: more than any prompt that
    fits the model needs, so the bound only stops text that could never fit, before it is
    tokenized.
    """

    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()
    max_concurrent_requests: int = 256
    max_n: int = 16
    max_prompts_per_request: int = 128
    max_prompt_chars: int | None = None
    max_request_body_bytes: int = 16 * MIB
    max_open_connections: int = 1024
    timeout_request_read_s: float = 30.0
    timeout_keep_alive_s: float = 5.0
    shutdown_timeout_s: float = 30.0
    engine_poll_interval_s: float = 0.5
    log_stats_interval_s: float = 10.0
    access_log: bool = True
    chat_template: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_concurrent_requests", "max_n", "max_prompts_per_request",
                     "max_request_body_bytes", "max_open_connections"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_prompt_chars is not None and (not isinstance(self.max_prompt_chars, int)
                                                  or self.max_prompt_chars < 1):
            raise ValueError(f"max_prompt_chars must be an integer >= 1, got {self.max_prompt_chars!r}")
        for name in ("timeout_request_read_s", "timeout_keep_alive_s", "engine_poll_interval_s",
                     "log_stats_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.shutdown_timeout_s >= 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
        object.__setattr__(self, "allowed_origins", tuple(self.allowed_origins))

    def prompt_char_limit(self, max_model_len: int) -> int:
        """The effective ``max_prompt_chars`` for a model of ``max_model_len`` tokens."""
        return self.max_prompt_chars if self.max_prompt_chars is not None else 32 * max_model_len
