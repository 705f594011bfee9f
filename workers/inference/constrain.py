"""Structured output and tool choice by grammar-constrained decoding, one logits processor per constrained row.

Why this shape: a constrained row must stay in the one continuous batch (mlx-lm's BatchGenerator), so the
constraint is a per-row logits processor: before each sampling step it feeds the row's grammar matcher the token
sampled last, asks it which tokens may come next, and sets every other logit to -inf. Rows without a constraint
carry no processor and pay nothing; the batch still decodes in one forward pass.

Why llguidance (compared here, Nov 2026, Python 3.11 on Linux x86_64; wheels checked for macOS arm64 too):
- llguidance 1.9.1: no Python dependencies, abi3 wheels for macOS arm64 and Linux x86_64/aarch64. A lexer plus
  Earley parser computes each mask on demand (no ahead-of-time index), so a new schema costs nothing to compile;
  the broadest JSON-Schema coverage of the three (anyOf/oneOf, $ref and recursion, min/max, patterns,
  additionalProperties) and Lark grammars that embed JSON schemas (`%json {...}`), which tool-call formats need.
- xgrammar 0.2.9: requires torch (and triton on Linux) at install: refused, the server must not pull torch.
- outlines-core 0.2.14: compiles a schema to one regex and then an index over the whole vocabulary before the
  first token (seconds for nested schemas on a 150k vocabulary), no recursive schemas, no grammar around the JSON.
Measured on Qwen3's real 151k vocabulary (this 2-core machine at load average ~8): outlines-core built its index in
1.1 s per schema (paid by every request with a new schema, before its first token), then ~1 us per token;
llguidance compiled the same schemas in ~2 ms and computed a mask in 40-260 us per token. Clients send a schema per
request, so compile time matters more than a lookup; and the tool-call formats need special tokens around the JSON,
which llguidance's grammars express (`<[id]>`) and a byte regex does not. bench/serve --schema-mix prints the
per-token cost as this processor pays it; each processor also keeps it (`mask_seconds`, `masks`). On Qwen3's
vocabulary a mask costs 80-900 us of CPU (Nov 2026, load average ~5): most inside a JSON string, where most tokens
are allowed. The processor starts the step's forward pass before computing it (GrammarProcessor), so on a GPU the
mask overlaps the model; rows are masked one after another (llguidance's fill_next_token_bitmask_par would compute
them in parallel, but every row's token reaches its processor only inside BatchGenerator's per-row loop, one at a
time; masking in the sampler instead would allow it, at the price of per-row sampling for the whole batch).

What is constrained:
- response_format json_object: any JSON object; json_schema: its `schema` (strict true: keywords the compiler
  does not implement are an error; strict false: they are ignored, as OpenAI's non-strict mode does).
- tool_choice "required" / a named function: the output is one call in the model family's own format, its name
  one of the tools (or the named one) and its arguments valid against that tool's `parameters` schema.
  Supported formats: `<tool_call>{"name", "arguments"}</tool_call>` (mlx-lm's json_tools parser: Qwen,
  Hermes-style templates), Llama 3's bare `{"name", "parameters"}`, gpt-oss's harmony commentary message
  (`<|channel|>commentary to=functions.NAME<|message|>{...}<|call|>`) and Mistral v0.3's
  `[TOOL_CALLS] [{"name", "arguments"}, ...]`. Other formats are refused with a 400 rather than generated
  unconstrained.
- tool_choice "auto" (and no tool_choice with tools, OpenAI's default): text is free; a call the model opens is
  held to the same call grammar from its opening on. The processor watches the tokens for the format's opening
  (`<tool_call>`, harmony's `<|channel|>` - after which a header may still open an ordinary message -, Mistral's
  `[TOOL_CALLS]`; for Llama 3, whose calls have no marker, the reply's first token: the grammar's tokens or any
  token that does not open a JSON object), switches its matcher on there and off again when the call is complete.
  Why this and not a lazy grammar (llguidance can express "free text, then trigger, then %json", with `lazy`
  lexemes or `<[^id]>*` token ranges): a grammar that covers the free text must compute a mask for every text
  token, 40-600 us each on a large vocabulary, paid by every tools request that never calls; switching on the
  marker costs nothing until a call opens, and the text router (textout.py) already finds calls by the same
  markers. Formats without a grammar here keep auto calls as the model writes them (no 400: auto is the default).
- On a thinking model whose prompt opens a think block, the grammar starts after the think end marker.
- parallel_tool_calls false (Anthropic: disable_parallel_tool_use): at most one call; after it only the end.
  Otherwise "required" is at least one call (OpenAI's definition), in formats that can hold several
  (`<tool_call>` blocks one after another, Mistral's list); Llama 3's bare JSON and harmony hold one per reply.
- Extra keys (strict_objects(), as xgrammar's default strict mode): for generation, an object schema that lists
  `properties` and does not say `additionalProperties` gets none beyond them, and an array with `prefixItems`
  and no `items` no items beyond them. JSON Schema's default (anything else allowed) let a grammar-held model
  fill junk keys (`" ": null` again and again) into pydantic's and most tool schemas, which never say
  `additionalProperties: false`. An object without `properties` (json_object, `{"type": "object"}`) stays open.
  Validation of the response is still the schema's own; only what is generated is narrowed.
JSON whitespace (JSON_OPTIONS): at most one space around each "," ":" "{" "}" "[" "]", so both the compact form
(`{"name":"f","parameters":{}}`, Llama 3's own) and the spaced one (`{"name": "f"}`, Python's json.dumps) follow
the model's own tokens, while a model still cannot spend its tokens on whitespace (a separator forced to a form
the model does not write pushes it off its own tokens into nested garbage). A row cut off by max_tokens ends
with finish_reason "length" and whatever JSON was made so far.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from llguidance import LLMatcher

from .textout import is_harmony

log = logging.getLogger("mlxk.inference.constrain")

# at most one space in each gap: compact and spaced JSON both pass, whitespace cannot run on (F6 of QA, Nov 2026)
JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": "[ ]?"}
FORMAT_JSON_TOOLS = "json_tools"   # <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>
FORMAT_LLAMA3 = "llama3"           # {"name": ..., "parameters": {...}}
FORMAT_HARMONY = "harmony"         # gpt-oss: <|channel|>commentary to=functions.NAME<|message|>{...}<|call|>
FORMAT_MISTRAL = "mistral"         # Mistral v0.3: [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...] then EOS
HARMONY_TOKENS = ("<|channel|>", "<|message|>", "<|call|>")


class ConstraintError(ValueError):
    """A response_format or tool schema that cannot be compiled; `param` names the request field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param, self.message = param, message


@dataclass(frozen=True)
class Spec:
    """What a request asks to constrain, independent of any model (the api checks it, the worker compiles it)."""
    response_schema: dict | None = None   # response_format json_object / json_schema
    strict: bool = False
    tools: tuple = ()                     # the function tools a call may name (tool_choice required / named / auto)
    auto: bool = False                    # tool_choice "auto": free text, but a call the model opens is constrained
    parallel: bool = True                 # parallel_tool_calls: false allows at most one call

    @property
    def wants_call(self) -> bool:
        return bool(self.tools)


def spec_from(response_format: Any, tools: Any, tool_choice: Any, parallel_tool_calls: Any = None) -> Spec | None:
    """The constraint a request carries, or None. Raises ConstraintError naming the field at fault.
    parallel_tool_calls: OpenAI's field (None means true); false allows at most one call."""
    schema, strict = None, False
    if isinstance(response_format, dict):
        kind = response_format.get("type", "text")
        if kind == "json_object":
            schema = {"type": "object"}
        elif kind == "json_schema":
            js = response_format.get("json_schema")
            if not isinstance(js, dict):
                raise ConstraintError("response_format.json_schema",
                                      "response_format type 'json_schema' needs a json_schema object with the schema")
            schema = js.get("schema", {"type": "object"})
            strict = bool(js.get("strict"))
            if not isinstance(schema, dict):
                raise ConstraintError("response_format.json_schema.schema", "the schema must be a JSON object")
        elif kind != "text":
            raise ConstraintError("response_format.type",
                                  f"response_format type {kind!r} is not one of 'text', 'json_object', 'json_schema'")
    chosen: tuple = ()
    functions = [t["function"] for t in tools or () if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    auto = False
    if tool_choice == "required":
        chosen = tuple(functions)
    elif tool_choice in (None, "auto") and schema is None and functions:
        chosen, auto = tuple(functions), True   # OpenAI's default with tools; a response_format wins over calls
    elif isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice.get("function"), dict) \
            else None
        if not isinstance(name, str):
            raise ConstraintError("tool_choice.function.name",
                                  'a tool_choice object needs {"type": "function", "function": {"name": ...}}')
        chosen = tuple(f for f in functions if f.get("name") == name)
        if not chosen:
            known = ", ".join(repr(f.get("name")) for f in functions) or "none"
            raise ConstraintError("tool_choice.function.name",
                                  f"tool_choice names the function {name!r}, which is not in tools (tools: {known})")
    if schema is None and not chosen:
        return None
    spec = Spec(response_schema=schema, strict=strict, tools=chosen, auto=auto,
                parallel=parallel_tool_calls is not False)
    check(spec)
    return spec


def check(spec: Spec) -> None:
    """Compile every schema once without a tokenizer: a broken one is the request's fault, named precisely."""
    if spec.response_schema is not None:
        _validate(LLMatcher, _json_grammar(spec.response_schema, spec.strict), "response_format.json_schema.schema")
    for i, function in enumerate(spec.tools):
        _validate(LLMatcher, _json_grammar(_parameters(function), bool(function.get("strict"))),
                  f"tools[{i}].function.parameters")


def _validate(matcher_cls, grammar_or_error: str | Exception, param: str) -> None:
    error = grammar_or_error if isinstance(grammar_or_error, Exception) else None
    message = str(error) if error else matcher_cls.validate_grammar(grammar_or_error)
    if message and not message.startswith("WARNING"):
        raise ConstraintError(param, f"{param} is not a JSON schema this server can enforce: {message.strip()}")


def strict_objects(schema: Any) -> Any:
    """A copy of `schema` for generation in which objects that list `properties` without saying
    `additionalProperties` (or `unevaluatedProperties`) allow no other keys, and arrays with `prefixItems` but no
    `items` no other items: xgrammar's default strict mode (its `strict_mode=True`). Subschemas of `allOf` are left
    as they are (each names only part of the object's keys). The response is still validated against the schema
    as sent."""
    if isinstance(schema, list):
        return [strict_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas") \
                and isinstance(value, dict):
            out[key] = {k: strict_objects(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not", "if", "then", "else", "contains",
                     "propertyNames", "unevaluatedItems", "unevaluatedProperties", "anyOf", "oneOf", "prefixItems"):
            out[key] = strict_objects(value)
        else:   # const, enum, default, examples: data, not schemas; allOf: see above
            out[key] = value
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out \
            and "unevaluatedProperties" not in out and "allOf" not in out:
        out["additionalProperties"] = False
    if isinstance(out.get("prefixItems"), list) and "items" not in out and "unevaluatedItems" not in out:
        out["items"] = False
    return out


def _json_grammar(schema: dict, strict: bool) -> str | Exception:
    try:
        return LLMatcher.grammar_from_json_schema(strict_objects(schema),
                                                  defaults={**JSON_OPTIONS, "lenient": not strict})
    except (ValueError, TypeError) as e:
        return e


def _parameters(function: dict) -> dict:
    params = function.get("parameters")
    return params if isinstance(params, dict) and params else {"type": "object"}


def tool_format(tokenizer) -> str | None:
    """The tool-call format of a loaded tokenizer that a grammar can express, or None."""
    if is_harmony(tokenizer):
        return FORMAT_HARMONY
    parser = getattr(tokenizer, "tool_parser", None)
    module = getattr(parser, "__module__", "") or ""
    if module.endswith(".json_tools") and tokenizer.tool_call_start and tokenizer.tool_call_end:
        return FORMAT_JSON_TOOLS
    template = str(getattr(tokenizer, "chat_template", "") or "")
    if module.endswith(".mistral") and tokenizer.tool_call_start_tokens and "[ARGS]" not in template:
        return FORMAT_MISTRAL   # the JSON-list form; newer templates' `name[ARGS]{...}` form is not expressed here
    if "<|python_tag|>" in template or ('"parameters"' in template and "<|eot_id|>" in template):
        return FORMAT_LLAMA3
    return None


def format_markers(tokenizer, fmt: str | None) -> tuple:
    """The token ids of the markers a call format needs: (start, end) for json_tools, harmony's
    (<|channel|>, <|message|>, <|call|>)."""
    if fmt == FORMAT_HARMONY:
        return tuple((tokenizer.convert_tokens_to_ids(t),) for t in HARMONY_TOKENS)
    return (tokenizer.tool_call_start_tokens or (), tokenizer.tool_call_end_tokens or ())


def lark_grammar(spec: Spec, fmt: str | None, markers: tuple = ((), ())) -> str:
    """The grammar of the whole reply: a call (when one is required) or the response JSON. With tool_choice
    "auto" (spec.auto) it is the grammar of one call *after* its opening (gate()): the processor applies it from
    there (json_tools: after `<tool_call>`; harmony: after `<|channel|>`, where a free header may also open
    ordinary text; Llama 3: the bare JSON call, offered beside free text at the reply's start).

    markers: format_markers(). A marker that is one token is matched as that token (`<[id]>`): llguidance sees
    added tokens such as Qwen's `<tool_call>` as special, not as their text."""
    if not spec.wants_call:
        return _as_lark_json(spec.response_schema, spec.strict)
    if fmt is None:
        raise ConstraintError("tool_choice", "tool_choice 'required' or a named function needs a model whose tool-call "
                                             "format this server can constrain (json_tools, Llama 3, harmony or "
                                             "Mistral's JSON list); this one's is not supported: use tool_choice "
                                             "'auto'")
    if fmt == FORMAT_HARMONY:
        channel, message, call = (_lark_marker(ids) for ids in markers)
        calls = [f'({json.dumps("commentary to=functions." + str(f.get("name")))} {message} '
                 f'{_as_lark_json(_parameters(f), bool(f.get("strict")), rule=False)} {call})' for f in spec.tools]
        if spec.auto:   # after <|channel|>: a call, or the header of an ordinary message whose body is free
            return f'start: call | free\nfree: ("analysis" | "final" | "commentary") {message}\n' \
                   f'call: {" | ".join(calls)}\n'
        return f"start: {channel} ({' | '.join(calls)})\n"
    if fmt == FORMAT_MISTRAL:   # a list of calls after [TOOL_CALLS] (and a space, as the template writes it)
        items = [{"type": "object", "properties": {"name": {"const": f.get("name")}, "arguments": _parameters(f)},
                  "required": ["name", "arguments"], "additionalProperties": False} for f in spec.tools]
        array = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not spec.parallel:
            array["maxItems"] = 1
        body = _as_lark_json(array, any(bool(f.get("strict")) for f in spec.tools), rule=False)
        return f'start: {"" if spec.auto else _lark_marker(markers[0]) + " "}" "? {body}\n'
    args_key = "parameters" if fmt == FORMAT_LLAMA3 else "arguments"
    # auto, json_tools: the model's own call is held to the tools, not to one layout: the new lines around it are
    # optional and so are the arguments of a tool that requires none (mlx-lm's parser reads both as the same call)
    lenient = spec.auto and fmt == FORMAT_JSON_TOOLS
    calls = [{"type": "object", "properties": {"name": {"const": f.get("name")}, args_key: _parameters(f)},
              "required": ["name"] if lenient and not _parameters(f).get("required") else ["name", args_key],
              "additionalProperties": False} for f in spec.tools]
    call_schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    body = _as_lark_json(call_schema, any(bool(f.get("strict")) for f in spec.tools), rule=False)
    if fmt == FORMAT_JSON_TOOLS:
        start, end = (_lark_marker(ids) for ids in markers)
        if spec.auto:
            return f'start: "\\n"? {body} "\\n"? {end}\n'
        return f'start: {start} "\\n" {body} "\\n" {end}\n'
    return f"start: {body}\n"


def gate(spec: Spec, fmt: str | None, markers: tuple) -> tuple:
    """With tool_choice "auto": the token ids after which the grammar applies (the format's call opening), until
    the call is complete; then the row is free again. () when the grammar applies from the start."""
    if not spec.auto:
        return ()
    if fmt in (FORMAT_JSON_TOOLS, FORMAT_HARMONY, FORMAT_MISTRAL):
        return tuple(markers[0])
    return ()


def call_end(fmt: str | None, markers: tuple) -> tuple:
    """The token that ends a call under a gate (json_tools: the end marker's last token; harmony: `<|call|>`)."""
    if fmt == FORMAT_HARMONY:
        return tuple(markers[2][-1:])
    if fmt == FORMAT_JSON_TOOLS:
        return tuple(markers[1][-1:])
    return ()


def auto_supported(fmt: str | None) -> bool:
    """Whether tool_choice "auto" calls can be constrained in this format (others stay free, as the model writes)."""
    return fmt in (FORMAT_JSON_TOOLS, FORMAT_LLAMA3, FORMAT_HARMONY, FORMAT_MISTRAL)


def _lark_marker(ids) -> str:
    return " ".join(f"<[{int(i)}]>" for i in ids)


def _as_lark_json(schema: dict, strict: bool, rule: bool = True) -> str:
    options = {**JSON_OPTIONS, "lenient": not strict}
    own = schema.get("x-guidance")   # llguidance's per-schema options, if the client sent some
    embedded = {**strict_objects(schema), "x-guidance": {**options, **(own if isinstance(own, dict) else {})}}
    body = f"%json {json.dumps(embedded)}"
    return f"start: {body}\n" if rule else body


class Vocabulary:
    """llguidance's view of a model's vocabulary (`ll`), plus per-token facts the Llama 3 "auto" opening needs,
    computed on first use (~0.1 s for a 128k vocabulary) and kept with the model."""

    def __init__(self, ll):
        self.ll = ll
        self.size = ll.vocab_size
        self._openers = None

    def _classify(self) -> None:
        import numpy as np

        braces = np.zeros(self.size, dtype=bool)
        neutral = np.zeros(self.size, dtype=bool)
        eos = set(self.ll.eos_tokens)
        for i in range(self.size):
            if self.ll.is_special_token(i):
                neutral[i] = i not in eos
                continue
            text = self.ll.decode_bytes([i]).lstrip()
            braces[i] = text.startswith(b"{")
            neutral[i] = not text
        self._openers, self._neutral = braces, neutral

    @property
    def json_openers(self):
        """bool per token: its text, leading whitespace aside, starts with "{" (it would open a bare JSON call)."""
        if self._openers is None:
            self._classify()
        return self._openers

    @property
    def neutral(self):
        """bool per token: whitespace only, or a special token other than EOS (text not yet decided)."""
        if self._openers is None:
            self._classify()
        return self._neutral


def grammar_tokenizer(hf_tokenizer, eos_ids) -> Vocabulary:
    """llguidance's view of a model's vocabulary (about 1 s for a 150k vocabulary: cache it per model)."""
    import llguidance.hf  # lazy: it imports transformers, which the api's schema checks never need

    return Vocabulary(llguidance.hf.from_tokenizer(hf_tokenizer, eos_token=sorted(eos_ids)))


WAITING, GATED, OPENING, ACTIVE, OFF = "waiting", "gated", "opening", "active", "off"


class GrammarProcessor:
    """A BatchGenerator logits processor that keeps one row's tokens inside a grammar.

    BatchGenerator calls it once per decode step with the row's token context (its last entry is the token
    sampled in the step before; on the first call it is the last prompt token, which the grammar never sees).
    `after`: token ids after which anything is constrained (a think block's end marker); before them the row is
    free. tool_choice "auto" (two ways in; no mask is computed while the row writes text):
    - `gate`: token ids that open a call (`<tool_call>`, harmony's `<|channel|>`); the grammar applies after each
      of them until it is complete (the matcher stops), then the row is free again, so text and several calls mix.
      `rearm=False` (Mistral, whose calls have no end marker and run to the end of the reply): after the calls,
      only EOS. `single_call` (parallel_tool_calls false): after the first call (a completion that ends on one of
      `call_end`, the format's last end-marker token) only EOS, too.
    - `opening` (Llama 3's bare JSON): at the reply's first token the model may start the call (tokens the grammar
      allows) or text (any token not opening a JSON object); whitespace and special tokens leave it undecided.
      A call is then held to the grammar; text leaves the row free for good.

    Masks are computed on the CPU while the step's forward pass runs: the processor first starts the logits'
    evaluation (`mx.async_eval`: MLX computes in its own threads, or on the GPU), then waits for its previous token
    and asks the matcher, so the mask cost overlaps the model instead of following it (BatchGenerator would
    otherwise queue the forward pass only after every processor of the step has returned).
    """

    def __init__(self, vocab: Vocabulary, grammar: str, eos_ids, after: tuple = (), gate: tuple = (),
                 opening: bool = False, rearm: bool = True, single_call: bool = False, call_end: tuple = ()):
        self.vocab = vocab
        self.matcher = LLMatcher(vocab.ll, grammar)
        if self.matcher.is_error():
            raise ConstraintError("response_format", f"the grammar does not compile: {self.matcher.get_error()}")
        self.eos_ids = sorted(eos_ids)
        self.after, self.gate, self.opening, self.rearm = tuple(after), tuple(gate), opening, rearm
        self.single_call, self.call_end = single_call, frozenset(call_end)
        self.state = WAITING if self.after else self._entry()
        self.calls = 0                 # calls completed under a gate
        self._recent: list[int] = []
        self._grammar_allowed = None   # OPENING: the grammar's part of the last mask
        self._started = False
        self._failed = False
        self.mask_seconds = 0.0
        self.masks = 0

    def _entry(self) -> str:
        return GATED if self.gate else OPENING if self.opening else ACTIVE

    def __call__(self, tokens, logits):
        # lazy: the api process imports this module to check schemas and must never load MLX
        import mlx.core as mx

        if self.state == OFF:
            return logits
        mx.async_eval(logits)   # the forward pass runs while the mask is computed below
        if self._started:
            self._advance(int(tokens[-1].item()))
        self._started = True
        if self.state not in (ACTIVE, OPENING):
            return logits
        started = time.perf_counter()
        allowed = self._allowed(logits.shape[-1])
        out = mx.where(mx.array(allowed), logits, mx.array(-float("inf"), dtype=logits.dtype))
        self.mask_seconds += time.perf_counter() - started
        self.masks += 1
        return out

    def _allowed(self, vocab: int):
        import numpy as np

        allowed = np.zeros(vocab, dtype=bool)
        if not (self._failed or self.matcher.is_stopped()):
            # one bit per token (a 151k vocabulary is 19 KB); the model's logits may be padded past the
            # tokenizer's vocabulary: those rows stay masked
            bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
            n = min(vocab, len(bits), self.vocab.size)
            allowed[:n] = bits[:n]
        if self.state == OPENING:
            self._grammar_allowed = allowed.copy()
            n = min(vocab, self.vocab.size)
            allowed[:n] |= ~self.vocab.json_openers[:n]
            return allowed
        if self._failed or self.matcher.is_stopped() or self.matcher.is_accepting():
            allowed[[t for t in self.eos_ids if t < vocab]] = True
        return allowed

    def _advance(self, token: int) -> None:
        if self.state in (WAITING, GATED):
            want = self.after if self.state == WAITING else self.gate
            self._recent = (self._recent + [token])[-len(want):]
            if tuple(self._recent) == want:
                self._recent = []
                self.state = self._entry() if self.state == WAITING else ACTIVE
            return
        if self.state == OPENING:
            if self._grammar_allowed is not None and token < len(self._grammar_allowed) \
                    and self._grammar_allowed[token]:
                self.state = ACTIVE
            elif token < self.vocab.size and self.vocab.neutral[token]:
                return
            else:
                self.state = OFF
                return
        if self.state != ACTIVE or self._failed or self.matcher.is_stopped():
            return
        if not self.matcher.consume_token(token):
            # Only possible when a sampler picked a masked token; end the row rather than emit text off-grammar.
            log.warning("the grammar refused token %d (%s); ending the row", token, self.matcher.get_error())
            self._failed = True
            return
        if self.gate and self.rearm and self.matcher.is_stopped():   # the call is complete: text or a call follows
            if self.single_call and token in self.call_end:
                self.calls += 1
                return   # parallel_tool_calls false: the matcher stays stopped, so only EOS may follow
            self.matcher.reset()
            self.calls += 1
            self.state = GATED
