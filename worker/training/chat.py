"""Chat rows through the base model's own chat template: token ids and the trained tokens.

The template decides what is trained, in one of two ways:

* **Generation markers.** A template with `{% generation %}...{% endgeneration %}` blocks says
  itself which text the model generates: the row is tokenized by
  `apply_chat_template(..., return_dict=True, return_assistant_tokens_mask=True)` and the
  tokenizer's assistant mask is the trained span (one block per assistant message lets
  `weight: 0` messages be left out; an end-of-turn token right after a block is trained too).
* **Per-turn diff** (every other template). Assistant message i is trained on what the model
  would have to generate at that point: the text the template renders for the conversation
  up to and including message i, after the text it renders for the conversation before it
  with `add_generation_prompt=True`, up to the end of the turn (the end-of-turn token
  included; trailing whitespace after it is not). Turns whose rendering still stands in the
  rendering of the whole conversation are trained in that one sequence. A template that
  rewrites earlier turns once later ones follow (Qwen3 drops `<think>` blocks from history)
  is not prefix-stable: such a turn becomes a sequence of its own (its conversation up to
  and including it), so each turn is trained as the model generates it, in the context the
  template gives it at inference.

Each sequence is rendered once and tokenized once, as a whole; character spans become token
spans through the tokenizer's offsets (a token that carries any trained character is
trained). A row the template cannot render (it raises, or it silently drops the row's tools,
tool calls or tool results) is a `RenderError`, which the data module reports per line
before training starts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jinja2

from shared.chat_format import content_text

GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
# End-of-turn tokens of common families, trained when a generation block stops just before one.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
)
_REASON_CHARS = 160


class RenderError(ValueError):
    """A chat row the base model's chat template cannot render; `reason` is for the tenant."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ChatRow:
    """A valid chat row in the shape chat templates expect."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    trained: list[bool]  # per message: an assistant message with weight 1


@dataclass
class Rendered:
    """One text to tokenize and the character spans of it that are trained."""

    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)
    first_turn: int = 0


def chat_row(row: dict[str, Any]) -> ChatRow:
    """OpenAI's row shape to the template's: text parts joined, tool-call arguments decoded
    to objects (templates render them with `tojson`), tool results carrying the name of the
    function they answer, `content` '' where it is null."""
    messages: list[dict[str, Any]] = []
    function_of: dict[str, str] = {}
    trained: list[bool] = []
    for message in row["messages"]:
        role = message["role"]
        out: dict[str, Any] = {"role": role, "content": content_text(message.get("content"))}
        if "name" in message:
            out["name"] = message["name"]
        calls = message.get("tool_calls")
        if calls:
            out["tool_calls"] = [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {
                        "name": call["function"]["name"],
                        "arguments": json.loads(call["function"]["arguments"]),
                    },
                }
                for call in calls
            ]
            function_of.update({call["id"]: call["function"]["name"] for call in calls})
        if role == "tool":
            out["tool_call_id"] = message["tool_call_id"]
            if message["tool_call_id"] in function_of:
                out["name"] = function_of[message["tool_call_id"]]
        messages.append(out)
        trained.append(role == "assistant" and message.get("weight", 1) == 1)
    return ChatRow(messages, row.get("tools"), trained)


def has_generation_blocks(tokenizer: Any, tools: Sequence[Any] | None = None) -> bool:
    template = tokenizer.get_chat_template(None, tools)
    return bool(GENERATION_BLOCK.search(template))


def render(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    *,
    generation_prompt: bool,
) -> str:
    """The template's text for `messages`; template failures become a `RenderError`."""
    try:
        return str(
            tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
            )
        )
    except Exception as exc:
        raise _template_failure(exc) from exc


def _template_failure(exc: Exception) -> RenderError:
    """The template's own words (`raise_exception(...)`, jinja's undefined-field errors), else
    only the kind of failure: no paths or library internals reach the tenant."""
    if isinstance(exc, jinja2.TemplateError):
        detail = " ".join(str(exc).split())[:_REASON_CHARS]
        return RenderError(f"the base model's chat template refuses the row: {detail}")
    return RenderError(f"the base model's chat template fails on the row ({type(exc).__name__})")


def _turn(tokenizer: Any, row: ChatRow, i: int) -> tuple[str, int, int]:
    """(the conversation up to and including message i, start and end of message i's turn)."""
    text = render(tokenizer, row.messages[: i + 1], row.tools, generation_prompt=False)
    if i == 0:  # no conversation before it to render (templates read messages[0]): a probe
        probe = [{**row.messages[0], "content": "\x01" + row.messages[0]["content"]}]
        prompt = render(tokenizer, probe, row.tools, generation_prompt=False)
    else:
        prompt = render(tokenizer, row.messages[:i], row.tools, generation_prompt=True)
    start = len(prompt)
    if not text.startswith(prompt):  # a generation prompt the turn does not begin with
        pairs = enumerate(zip(prompt, text, strict=False))
        start = next((k for k, (a, b) in pairs if a != b), min(len(prompt), len(text)))
    end = len(text.rstrip())
    if end <= start:
        raise RenderError(f"the base model's chat template renders nothing for messages[{i}]")
    return text, start, end


def _check_tool_support(row: ChatRow, full: str, turns: dict[int, str]) -> None:
    """A template without tool support renders a tool-calling row without complaint, minus its
    tools, calls or results; training on that would teach the model something else."""
    for tool in row.tools or []:
        if tool["function"]["name"] not in full:
            raise RenderError(
                "the base model's chat template does not render 'tools' (it has no tool support)"
            )
    for i, message in enumerate(row.messages):
        for call in message.get("tool_calls", []):
            if call["function"]["name"] not in turns[i]:
                raise RenderError(
                    f"the base model's chat template does not render messages[{i}].tool_calls "
                    "(it has no tool support)"
                )
        if message["role"] == "tool" and not _shows(message["content"], full):
            raise RenderError(
                f"the base model's chat template does not render the tool result messages[{i}]"
            )


def _shows(content: str, text: str) -> bool:
    """Whether `text` holds `content`, as is or JSON-escaped (Llama 3.1 renders a tool result
    with `tojson`)."""
    content = content.strip()
    return content in text or json.dumps(content, ensure_ascii=False)[1:-1] in text


def _diff_sequences(tokenizer: Any, row: ChatRow, full: str) -> list[Rendered]:
    turns = {
        i: _turn(tokenizer, row, i)
        for i, message in enumerate(row.messages)
        if row.trained[i] or message.get("tool_calls")
    }
    _check_tool_support(row, full, {i: text[a:b] for i, (text, a, b) in turns.items()})
    sequences = [Rendered(full, first_turn=len(row.messages))]
    for i in sorted((i for i in turns if row.trained[i]), reverse=True):
        text, start, end = turns[i]
        head = text[:end]
        home = next((s for s in sequences if s.text.startswith(head)), None)
        if home is None:
            home = Rendered(head)
            sequences.append(home)
        home.spans.append((start, end))
        home.first_turn = i
    return sorted((s for s in sequences if s.spans), key=lambda s: s.first_turn)


def _trained_by_offsets(
    tokenizer: Any, text: str, spans: list[tuple[int, int]], *, special: bool
) -> tuple[list[int], list[bool]]:
    """Tokenize `text` once; a token is trained when it carries a character of a span."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        trained = [any(s < b and e > a for a, b in spans) for s, e in enc["offset_mapping"]]
        return ids, trained
    # No offsets (a Python tokenizer): a span starts at the token count of the text before it.
    ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])
    trained = [False] * len(ids)
    for a, b in spans:
        start = len(tokenizer(text[:a], add_special_tokens=special)["input_ids"])
        end = len(tokenizer(text[:b], add_special_tokens=special)["input_ids"])
        trained[start:end] = [True] * (end - start)
    return ids, trained


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[name] for name in END_OF_TURN_TOKENS if name in vocab)
    return ids


def _marked_sequence(tokenizer: Any, row: ChatRow) -> tuple[list[int], list[bool]]:
    try:
        out = tokenizer.apply_chat_template(
            row.messages,
            tools=row.tools,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
    except Exception as exc:
        raise _template_failure(exc) from exc
    ids = list(out["input_ids"])
    mask = [bool(m) for m in out["assistant_masks"]]
    runs: list[list[int]] = []
    for t, marked in enumerate(mask):
        if marked and (t == 0 or not mask[t - 1]):
            runs.append([t, t + 1])
        elif marked:
            runs[-1][1] = t + 1
    assistants = [i for i, m in enumerate(row.messages) if m["role"] == "assistant"]
    if len(runs) == len(assistants):
        runs = [run for run, i in zip(runs, assistants, strict=True) if row.trained[i]]
    elif not all(row.trained[i] for i in assistants):
        raise RenderError(
            f"the chat template marks {len(runs)} generation blocks for {len(assistants)} "
            "assistant messages, so 'weight' cannot tell which to leave out"
        )
    ends = end_of_turn_ids(tokenizer)
    trained = [False] * len(ids)
    for start, end in runs:
        if end < len(ids) and ids[end] in ends:
            end += 1  # the block stops before the end-of-turn token: the model must learn it
        trained[start:end] = [True] * (end - start)
    return ids, trained


def chat_sequences(tokenizer: Any, row: dict[str, Any]) -> list[tuple[list[int], list[bool]]]:
    """Token ids and trained flags of a valid chat row: one sequence, or one per turn whose
    rendering the template rewrites later (see the module docstring)."""
    chat = chat_row(row)
    full = render(tokenizer, chat.messages, chat.tools, generation_prompt=False)
    if has_generation_blocks(tokenizer, chat.tools):
        turns = {
            i: _turn(tokenizer, chat, i) for i, m in enumerate(chat.messages) if m.get("tool_calls")
        }
        _check_tool_support(chat, full, {i: text[a:b] for i, (text, a, b) in turns.items()})
        return [_marked_sequence(tokenizer, chat)]
    return [
        _trained_by_offsets(tokenizer, seq.text, seq.spans, special=False)
        for seq in _diff_sequences(tokenizer, chat, full)
    ]


def answer_sequence(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> tuple[list[int], list[bool]]:
    """A conversation ending with an assistant answer (template-shaped messages), rendered and
    tokenized once; only the answer's turn (its end-of-turn token included) is trained, found
    by the per-turn diff. For callers with a prompt and one answer (preference pairs)."""
    last = len(messages) - 1
    row = ChatRow(messages, tools, [i == last for i in range(len(messages))])
    text, start, end = _turn(tokenizer, row, last)
    return _trained_by_offsets(tokenizer, text[:end], [(start, end)], special=False)


def completion_sequence(
    tokenizer: Any, prompt: str, completion: str
) -> tuple[list[int], list[bool]]:
    """`prompt + completion` tokenized together (with the tokenizer's BOS), then EOS; the
    completion's tokens and EOS are trained. Together, because a SentencePiece tokenizer
    would start a separately tokenized completion with a spurious word-start space."""
    text = prompt + completion
    ids, trained = _trained_by_offsets(tokenizer, text, [(len(prompt), len(text))], special=True)
    eos = tokenizer.eos_token_id
    if eos is not None:
        if ids and ids[-1] == eos and not trained[-1]:  # the tokenizer appends EOS itself
            trained[-1] = True
        else:
            ids.append(eos)
            trained.append(True)
    return ids, trained
