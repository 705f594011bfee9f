"""The OpenAI request bodies, as pydantic models: the HTTP boundary and nothing more.

Real clients send many optional fields, so every field of OpenAI's chat-completions and completions request
schemas is declared (from the `openai` package's `completion_create_params.py` files) and fields outside the
schema are ignored. A field at its default or neutral value is fine; one that asks for something this server
cannot do (n > 1, logprobs, audio, a JSON schema, ...) is refused by `unsupported()` with a 400 naming it, rather
than silently ignored. Values OpenAI's published schema rejects (a temperature above 2, five stop strings, a message
without content, a tool without a function) are refused too: ranges by the field declarations, shapes by
`invalid()`, each naming the field in `param`. Vendor extensions that mlx servers commonly accept (top_k, min_p, repetition_penalty,
keep_alive, chat_template_kwargs) are declared too.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from mlxk.config import parse_duration

# ---------------------------------------------------------------- shared pieces


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: Optional[bool] = None
    include_obfuscation: Optional[bool] = None


KeepAlive = Union[float, str, None]
Stop = Union[str, list[str], None]
ReasoningEffort = Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]]
MESSAGE_ROLES = ("developer", "system", "user", "assistant", "tool", "function")
MAX_STOP = 4   # OpenAI's limit on stop sequences


def keep_alive_seconds(value: KeepAlive) -> float | None:
    """ollama-style keep_alive: seconds or a duration ("30s", "10m", "1h30m"); negative (-1, "-1m") = forever."""
    return None if value is None else parse_duration(value)


class _Common(BaseModel):
    """Fields both endpoints share."""
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    logit_bias: Optional[dict[str, Any]] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    n: Optional[int] = Field(default=None, ge=1, le=128)
    seed: Optional[int] = None
    stop: Stop = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, ge=0, le=1)
    user: Optional[str] = None
    # vendor extensions (mlx_lm.server, vLLM, ollama)
    top_k: Optional[int] = Field(default=None, ge=0)
    min_p: Optional[float] = Field(default=None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(default=None, gt=0)
    keep_alive: KeepAlive = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def common_unsupported(self) -> tuple[str, str] | None:
        if self.n not in (None, 1):
            return "n", "n > 1 is not supported: ask for one choice and repeat the request"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        return None

    def common_invalid(self) -> tuple[str, str] | None:
        """(param, message) for a value OpenAI's schema rejects that a field declaration cannot express."""
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            return "stop", f"stop takes at most {MAX_STOP} sequences; {len(self.stop)} were given"
        if self.stream_options is not None and not self.stream:  # OpenAI's own 400 and words
            return "stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled."
        try:
            keep_alive_seconds(self.keep_alive)
        except ValueError as e:
            return "keep_alive", f"keep_alive: {e}"
        return None


# ---------------------------------------------------------------- /v1/chat/completions


class ChatCompletionRequest(_Common):
    messages: list[dict[str, Any]] = Field(min_length=1)
    audio: Optional[dict[str, Any]] = None
    function_call: Union[str, dict[str, Any], None] = None
    functions: Optional[list[dict[str, Any]]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    metadata: Optional[dict[str, Any]] = None
    modalities: Optional[list[str]] = None
    moderation: Optional[dict[str, Any]] = None
    parallel_tool_calls: Optional[bool] = None
    prediction: Optional[dict[str, Any]] = None
    prompt_cache_key: Optional[str] = None
    prompt_cache_options: Optional[dict[str, Any]] = None
    prompt_cache_retention: Optional[str] = None
    reasoning_effort: ReasoningEffort = None
    response_format: Optional[dict[str, Any]] = None
    safety_identifier: Optional[str] = None
    service_tier: Optional[str] = None
    store: Optional[bool] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    tools: Optional[list[dict[str, Any]]] = None
    verbosity: Optional[Literal["low", "medium", "high"]] = None
    web_search_options: Optional[dict[str, Any]] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None  # vendor extension (vLLM, mlx_lm.server)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_kwargs(self) -> dict | None:
        """chat_template_kwargs, with reasoning_effort "none" turned into the templates' enable_thinking=False."""
        kwargs = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort == "none":
            kwargs.setdefault("enable_thinking", False)
        return kwargs or None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for the first field that asks for something this server cannot do."""
        if (found := self.common_unsupported()) is not None:
            return found
        if self.logprobs:
            return "logprobs", "logprobs are not supported"
        if self.top_logprobs:
            return "top_logprobs", "top_logprobs are not supported"
        if self.audio is not None or (self.modalities and any(m != "text" for m in self.modalities)):
            return ("audio" if self.audio is not None else "modalities"), "only text output is supported"
        if self.functions or self.function_call not in (None, "none", "auto"):
            field = "functions" if self.functions else "function_call"
            return field, f"{field} is deprecated and not supported; use tools and tool_choice"
        if self.web_search_options is not None:
            return "web_search_options", "web search is not supported"
        if self.moderation is not None:
            return "moderation", "moderation is not supported"
        if self.tool_choice not in (None, "none", "auto", "required") and not isinstance(self.tool_choice, dict):
            return "tool_choice", f"tool_choice {self.tool_choice!r} must be 'none', 'auto', 'required' or an object"
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            return "tool_choice", "tool_choice needs tools"
        for i, message in enumerate(self.messages):
            for j, part in enumerate(message.get("content") if isinstance(message.get("content"), list) else ()):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in ("image_url", "input_audio", "file"):
                    return (f"messages[{i}].content[{j}]",
                            f"{kind} content parts are not supported: this server runs text models; send text parts")
        for i, tool in enumerate(self.tools or ()):
            if isinstance(tool, dict) and tool.get("type") == "custom":
                return f"tools[{i}]", "custom tools are not supported; declare a function tool"
        return self.unenforceable()

    def unenforceable(self) -> tuple[str, str] | None:
        """(param, message) when response_format or tool_choice asks for a constraint that cannot be compiled: a
        schema the grammar compiler rejects (a tool's parameters too: with tool_choice "auto" a call the model
        opens is constrained), or a named function that is not in tools (constrain.py)."""
        if not self.response_format and (not self.tools or self.tool_choice == "none"):
            return None
        from mlxk.workers.inference import constrain

        tool_choice = self.tool_choice if self.tools else None
        try:
            constrain.spec_from(self.response_format, self.tools, tool_choice)
        except constrain.ConstraintError as e:
            return e.param, e.message
        return None

    def invalid(self) -> tuple[str, str] | None:
        """(param, message) for the first message or tool whose shape OpenAI's schema rejects."""
        if (found := self.common_invalid()) is not None:
            return found
        for i, message in enumerate(self.messages):
            if (found := _invalid_message(f"messages[{i}]", message)) is not None:
                return found
        for i, tool in enumerate(self.tools or ()):
            if (found := _invalid_tool(f"tools[{i}]", tool)) is not None:
                return found
        return None


def _invalid_message(where: str, message: dict) -> tuple[str, str] | None:
    role = message.get("role")
    if role not in MESSAGE_ROLES:
        return f"{where}.role", f"role must be one of {', '.join(MESSAGE_ROLES)}; got {role!r}"
    content = message.get("content")
    if content is None:
        if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
            return None
        needs = "content (or tool_calls)" if role == "assistant" else "content"
        return f"{where}.content", f"a {role} message needs {needs}"
    if isinstance(content, str):
        pass
    elif isinstance(content, list) and content:
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                return f"{where}.content[{j}]", "a content part must be an object with a string 'type'"
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                return f"{where}.content[{j}].text", "a text content part needs a string 'text'"
    else:
        return f"{where}.content", "content must be a string or a non-empty list of content parts"
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        return f"{where}.tool_call_id", "a tool message needs the tool_call_id it answers"
    return None


def _invalid_tool(where: str, tool: Any) -> tuple[str, str] | None:
    if not isinstance(tool, dict) or tool.get("type") not in ("function", "custom"):
        return f"{where}.type", "a tool needs type 'function'"
    if tool["type"] == "custom":
        return None  # a valid shape that unsupported() refuses
    function = tool.get("function")
    if not isinstance(function, dict):
        return f"{where}.function", "a function tool needs a 'function' object with a 'name'"
    if not isinstance(function.get("name"), str) or not function["name"]:
        return f"{where}.function.name", "a function tool needs a 'function.name'"
    if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
        return f"{where}.function.parameters", "function.parameters must be a JSON Schema object"
    return None


# ---------------------------------------------------------------- /v1/completions


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]], None]  # required, as in OpenAI's schema
    best_of: Optional[int] = Field(default=None, ge=0, le=20)
    echo: Optional[bool] = None
    logprobs: Optional[int] = Field(default=None, ge=0, le=5)
    suffix: Optional[str] = None

    def prompt_text(self) -> str:
        if self.prompt is None:
            return ""
        if isinstance(self.prompt, str):
            return self.prompt
        return self.prompt[0]  # unsupported() has made sure this is a one-string list

    def unsupported(self) -> tuple[str, str] | None:
        if (found := self.common_unsupported()) is not None:
            return found
        if self.best_of not in (None, 1):
            return "best_of", "best_of > 1 is not supported"
        if self.echo:
            return "echo", "echo is not supported"
        if self.logprobs:
            return "logprobs", "logprobs are not supported"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported"
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1 or not isinstance(self.prompt[0], str):
                return "prompt", "prompt must be a string (or a list of exactly one string); " \
                                 "batches and token ids are not supported"
        return None

    def invalid(self) -> tuple[str, str] | None:
        return self.common_invalid()

# ---------------------------------------------------------------- the OpenAPI document


class ErrorDetail(BaseModel):
    message: str
    type: str                  # OpenAI's kind: invalid_request_error, authentication_error, permission_error, ...
    param: Optional[str] = None
    code: str                  # mlxk's stable error type (mlxk.errors), e.g. model_not_found


class ErrorResponse(BaseModel):
    """Every error the server answers, whatever the status (app.openai_error)."""
    error: ErrorDetail


_ERROR_MEANING = {
    400: "Invalid request: bad JSON, a wrong type, an unsupported field, a body nested too deeply or not Unicode",
    401: "Missing or wrong API key (only when the server has one)",
    403: "Cross-site request: the Origin is not this server nor in MLXK_CORS_ORIGINS",
    404: "Unknown model or job",
    405: "Method not allowed (the Allow header lists the allowed ones)",
    409: "Conflict: another job holds the model, or the job is in the wrong state",
    413: "Request body larger than MLXK_MAX_BODY_BYTES",
    415: "Content-Type is not application/json",
    421: "Host header names neither this server nor a loopback address (MLXK_ALLOWED_HOSTS)",
    503: "The inference worker is busy or restarting; retry (Retry-After)",
}
READ_ERRORS = (401, 404, 421)
WRITE_ERRORS = (400, 401, 403, 404, 413, 415, 421)


class AnthropicErrorDetail(BaseModel):
    type: str                  # Anthropic's kind: invalid_request_error, not_found_error, overloaded_error, ...
    message: str
    code: str                  # mlxk's stable error type


class AnthropicErrorResponse(BaseModel):
    """Every error of the Anthropic Messages routes (/v1/messages...)."""
    type: Literal["error"]
    error: AnthropicErrorDetail
    request_id: Optional[str] = None


def error_responses(*statuses: int, model: type[BaseModel] = ErrorResponse) -> dict:
    """FastAPI `responses=` for these statuses, each with the dialect's error body (OpenAI's unless `model`)."""
    return {status: {"model": model, "description": _ERROR_MEANING[status]} for status in statuses}


def _inline_defs(schema: dict) -> dict:
    """pydantic puts nested models under `$defs`; an operation's schema must stand alone, so inline them."""
    defs = schema.pop("$defs", {})

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.rsplit("/", 1)[-1]])
            return {key: walk(value) for key, value in node.items()}
        return [walk(item) for item in node] if isinstance(node, list) else node

    return walk(schema)


def request_body(model: type[BaseModel] | None, *, required: bool = True) -> dict:
    """FastAPI `openapi_extra=` declaring a JSON request body: handlers read bodies themselves (deps.parse_body,
    for OpenAI-shaped 400s), so FastAPI cannot see them. `model` None: an empty JSON object."""
    schema = _inline_defs(model.model_json_schema()) if model else {"type": "object", "additionalProperties": False}
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": schema}}}}
