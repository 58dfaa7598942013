"""Chat templates as models ship them: which tokens each template trains.

Every template here is written in the shape of a real family's (Llama-3 with a default system
prompt, Qwen2.5 with a `tools` block and Hermes `<tool_call>` JSON, Qwen3 dropping `<think>`
blocks from history, a template with `{% generation %}` markers, Gemma refusing a system
role) on a byte-level tokenizer, so a decoded span is exactly the text trained. The
SentencePiece case uses a small Metaspace BPE tokenizer trained here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tests.training.helpers import small_spec, write_jsonl
from worker.training import loop
from worker.training.chat import RenderError
from worker.training.data import DataError, Example, read_rows, row_examples, tokenize_rows
from worker.training.hooks import TrainHooks
from worker.training.model import load_tokenizer
from worker.training.tiny import build_tokenizer

LLAMA3 = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = 'Cutting Knowledge Date: December 2023' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA3_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

QWEN_TOOLS_BLOCK = (
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": '
    '<function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
)
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25 = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- '"
    + QWEN25_DEFAULT_SYSTEM
    + "' }}{%- endif %}{{- '\\n\\n' }}"
    + QWEN_TOOLS_BLOCK
    + "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n" + QWEN25_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' }}{{- tool_call.name }}'
    "{{- '\", \"arguments\": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN3 = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}"
    "{%- else %}{%- set content = '' %}{%- endif %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set reasoning_content = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n')"
    " + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
# `{% generation %}` around the content only: the template says the empty think block it puts
# before every answer is not generated (the diff would train it: the generation prompt stops
# before it), and the end-of-turn token after the block must still be trained.
MARKED = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}"
    "{% generation %}{{- message.content }}{% endgeneration %}{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant'"
    " else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>"]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def byte_tokenizer(template: str, specials: list[str], eos: str | None = None) -> Any:
    """The tiny model's byte-level tokenizer with a family's control tokens and template."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens(
        {"additional_special_tokens": specials}, replace_extra_special_tokens=False
    )
    if eos is not None:
        tokenizer.eos_token = eos
    tokenizer.chat_template = template
    return tokenizer


def spans(tokenizer: Any, example: Example) -> list[str]:
    """The decoded runs of trained tokens, in order."""
    runs: list[list[int]] = []
    for t, (token, keep) in enumerate(zip(example.input_ids, example.trained, strict=True)):
        if keep and (t == 0 or not example.trained[t - 1]):
            runs.append([])
        if keep:
            runs[-1].append(token)
    return [tokenizer.decode(run) for run in runs]


def text(tokenizer: Any, example: Example) -> str:
    return str(tokenizer.decode(example.input_ids))


def chat(*turns: tuple[str, str], **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": content} for role, content in turns], **fields}


def test_llama3_default_system_prompt_is_context_and_eot_is_trained() -> None:
    tokenizer = byte_tokenizer(LLAMA3, LLAMA3_SPECIALS, eos="<|eot_id|>")
    row = chat(("user", "Q1"), ("assistant", "ANSWER-ONE"), ("user", "Q2"), ("assistant", "A2"))
    [example] = row_examples(row, tokenizer)
    assert text(tokenizer, example) == (
        "<|bos|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
        "December 2023<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ1<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nANSWER-ONE<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>"
    )
    assert spans(tokenizer, example) == ["ANSWER-ONE<|eot_id|>", "A2<|eot_id|>"]
    # weight 0: the first answer stays as context, untrained
    row["messages"][1]["weight"] = 0
    [example] = row_examples(row, tokenizer)
    assert spans(tokenizer, example) == ["A2<|eot_id|>"]
    assert "ANSWER-ONE" in text(tokenizer, example)


def test_qwen3_think_blocks_dropped_from_history_train_each_turn_as_generated() -> None:
    """The template renders an earlier turn without its reasoning once a later user turn
    follows, so render(prefix) is not a prefix of render(all): each turn is trained on what
    the model generates at that point, in the context the template gives it."""
    tokenizer = byte_tokenizer(QWEN3, CHATML_SPECIALS, eos="<|im_end|>")
    row = chat(
        ("system", "Think first."),
        ("user", "Q1"),
        ("assistant", "<think>\nR1\n</think>\n\nA1"),
        ("user", "Q2"),
        ("assistant", "<think>\nR2\n</think>\n\nA2"),
    )
    first, second = row_examples(row, tokenizer)
    assert text(tokenizer, first) == (
        "<|im_start|>system\nThink first.<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nR1\n</think>\n\nA1<|im_end|>"
    )
    assert spans(tokenizer, first) == ["<think>\nR1\n</think>\n\nA1<|im_end|>"]
    assert text(tokenizer, second) == (
        "<|im_start|>system\nThink first.<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nR2\n</think>\n\nA2<|im_end|>\n"
    )
    assert spans(tokenizer, second) == ["<think>\nR2\n</think>\n\nA2<|im_end|>"]


def test_qwen3_turns_without_reasoning_train_the_same_empty_think_block() -> None:
    """What the template renders for a final turn (an empty think block) is what the model
    generates there; every turn is trained that way, not only the last one."""
    tokenizer = byte_tokenizer(QWEN3, CHATML_SPECIALS, eos="<|im_end|>")
    row = chat(("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2"))
    examples = row_examples(row, tokenizer)
    assert [spans(tokenizer, e) for e in examples] == [
        ["<think>\n\n</think>\n\nA1<|im_end|>"],
        ["<think>\n\n</think>\n\nA2<|im_end|>"],
    ]
    row["messages"][1]["weight"] = 0
    [only] = row_examples(row, tokenizer)
    assert spans(tokenizer, only) == ["<think>\n\n</think>\n\nA2<|im_end|>"]


def test_generation_markers_decide_the_span_through_the_assistant_mask() -> None:
    tokenizer = byte_tokenizer(MARKED, CHATML_SPECIALS, eos="<|im_end|>")
    row = chat(("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2"))
    [example] = row_examples(row, tokenizer)
    # the per-turn diff would train "<think>\n\n</think>\n\nA1<|im_end|>"
    assert spans(tokenizer, example) == ["A1<|im_end|>", "A2<|im_end|>"]
    expected = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)
    assert example.input_ids == list(expected["input_ids"])
    row["messages"][3]["weight"] = 0
    [example] = row_examples(row, tokenizer)
    assert spans(tokenizer, example) == ["A1<|im_end|>"]


def tool_row() -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "It is 21 degrees."},
        ],
        "tools": [WEATHER],
    }


def test_tool_calls_render_through_the_templates_tool_support() -> None:
    tokenizer = byte_tokenizer(QWEN25, CHATML_SPECIALS, eos="<|im_end|>")
    [example] = row_examples(tool_row(), tokenizer)
    full = text(tokenizer, example)
    assert full.startswith(f"<|im_start|>system\n{QWEN25_DEFAULT_SYSTEM}\n\n# Tools\n")
    assert json.dumps(WEATHER) in full  # the tools block, as context
    assert "<tool_response>\n" + '{"temp": 21}' + "\n</tool_response>" in full
    assert spans(tokenizer, example) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        "<|im_end|>",
        "It is 21 degrees.<|im_end|>",
    ]


def test_tool_rows_on_a_template_without_tool_support_are_refused() -> None:
    tokenizer = byte_tokenizer(LLAMA3, LLAMA3_SPECIALS, eos="<|eot_id|>")
    with pytest.raises(RenderError, match=r"does not render 'tools' \(it has no tool support\)"):
        row_examples(tool_row(), tokenizer)
    no_tools = {"messages": tool_row()["messages"]}
    with pytest.raises(RenderError, match=r"does not render messages\[1\].tool_calls"):
        row_examples(no_tools, tokenizer)


def sentencepiece_tokenizer(template: str | None = None) -> Any:
    """A SentencePiece-style tokenizer (Metaspace BPE, word starts marked with '▁')."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    lines = ["Answer: four", "[INST] hello there [/INST] general kenobi", "four score"] * 4
    trainer = trainers.BpeTrainer(
        vocab_size=90, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    backend.train_from_iterator(lines, trainer)
    from tokenizers import processors

    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = template
    return tokenizer


def test_sentencepiece_completion_has_no_spurious_leading_space() -> None:
    tokenizer = sentencepiece_tokenizer()
    [example] = row_examples({"prompt": "Answer:", "completion": "four"}, tokenizer)
    trained = [t for t, keep in zip(example.input_ids, example.trained, strict=True) if keep]
    # tokenized together: "Answer:four" has no word start before "four"
    assert tokenizer.convert_ids_to_tokens(trained) == ["fo", "ur", "</s>"]
    assert example.input_ids == tokenizer("Answer:four")["input_ids"] + [tokenizer.eos_token_id]
    # what separate tokenization gives, and the row no longer does: a word-start "▁four"
    alone = tokenizer("four", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(alone) == ["▁four"]


def test_sentencepiece_chat_is_tokenized_as_one_text() -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}"
        "{{ '[INST] ' + m.content + ' [/INST]' }}{% else %}{{ ' ' + m.content + eos_token }}"
        "{% endif %}{% endfor %}"
    )
    tokenizer = sentencepiece_tokenizer(template)
    row = chat(("user", "hello there"), ("assistant", "general kenobi"))
    [example] = row_examples(row, tokenizer)
    rendered = "<s>[INST] hello there [/INST] general kenobi</s>"
    assert example.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    trained = [t for t, keep in zip(example.input_ids, example.trained, strict=True) if keep]
    assert tokenizer.decode(trained) == "general kenobi</s>"


def test_unrenderable_rows_are_per_line_errors_before_the_model_loads(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Gemma-style template refuses a system message: every such line is named, all at
    once, and the job stops before the base model is loaded or any step runs."""
    model_dir = tmp_path / "gemma-like"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = byte_tokenizer(GEMMA, ["<start_of_turn>", "<end_of_turn>"])
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(model_dir)
    ok = chat(("user", "hi"), ("assistant", "hello"))
    bad = chat(("system", "be brief"), ("user", "hi"), ("assistant", "hello"))
    data = write_jsonl(tmp_path / "train.jsonl", [ok, bad, ok, bad, ok, ok])
    spec = small_spec(model_dir, validation_fraction=0.0)
    expected = (
        rf"2 row\(s\) cannot be rendered: {data}: lines 2, 4: the base model's chat template "
        r"refuses the row: System role not supported$"
    )
    with pytest.raises(DataError, match=expected):
        tokenize_rows(read_rows(data), load_tokenizer(model_dir), 64)

    def no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the base model was loaded before the data was checked")

    class Recorder(TrainHooks):
        steps = 0

        def on_progress(self, metrics: Any) -> None:
            self.steps += 1

    monkeypatch.setattr(loop, "load_base_model", no_model)
    hooks = Recorder()
    with pytest.raises(DataError, match=expected):
        loop.train(spec, data, tmp_path / "out", hooks)
    assert hooks.steps == 0


LLAMA31_TOOLS = (
    "{{- bos_token }}"
    "{%- if tools %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython\\n' }}"
    "{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}"
    "{{- '<|eot_id|>' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- set tool_call = message.tool_calls[0].function %}"
    '{{- \'{"name": "\' + tool_call.name + \'", "parameters": \' }}'
    "{{- tool_call.arguments | tojson }}{{- '}' }}{{- '<|eom_id|>' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}"
    "{%- if message.content is mapping or message.content is iterable %}"
    "{{- message.content | tojson }}{%- else %}{{- message.content }}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- else %}{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n'"
    " + message.content | trim + '<|eot_id|>' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def test_llama31_style_tool_results_rendered_as_json_strings_are_accepted() -> None:
    """Llama 3.1 renders a string tool result with `tojson` (escaped quotes) and ends a tool
    call with <|eom_id|>: the row renders, the call is trained up to that token."""
    tokenizer = byte_tokenizer(LLAMA31_TOOLS, [*LLAMA3_SPECIALS, "<|eom_id|>"], eos="<|eot_id|>")
    [example] = row_examples(tool_row(), tokenizer)
    assert '"{\\"temp\\": 21}"' in text(tokenizer, example)
    assert spans(tokenizer, example) == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>',
        "It is 21 degrees.<|eot_id|>",
    ]


def test_answer_sequence_trains_only_the_final_answer() -> None:
    """The helper for a prompt and one answer (preference pairs): one text, trailing turn."""
    from worker.training.chat import answer_sequence

    tokenizer = byte_tokenizer(QWEN3, CHATML_SPECIALS, eos="<|im_end|>")
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nR1\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]
    example = Example(*answer_sequence(tokenizer, messages))
    assert "R1" not in text(tokenizer, example)  # history as the template renders it
    assert spans(tokenizer, example) == ["<think>\n\n</think>\n\nA2<|im_end|>"]


def test_a_chat_opening_with_the_assistant_trains_its_first_turn() -> None:
    """The prompt of a first assistant message is the template's empty conversation."""
    tokenizer = byte_tokenizer(LLAMA3, LLAMA3_SPECIALS, eos="<|eot_id|>")
    [example] = row_examples(chat(("assistant", "Welcome!"), ("user", "hi")), tokenizer)
    assert spans(tokenizer, example) == ["Welcome!<|eot_id|>"]
    assert text(tokenizer, example).startswith("<|bos|><|start_header_id|>system")
