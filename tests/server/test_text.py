"""Server text handling without a server: chat templates (vs transformers) and incremental detokenization."""

from __future__ import annotations

import json
import random

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from deltaserve.server.chat_template import ChatTemplate, ChatTemplateError
from deltaserve.server.detokenizer import IncrementalDetokenizer
from deltaserve.tokenizer import Tokenizer

# Qwen-like: a default system turn, tools as JSON, namespace + loop controls, raise_exception
QWENISH = """{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n' }}{%- for tool in tools %}{{- tool | tojson }}
{%- endfor %}{{- '<|im_end|>\\n' }}{%- elif messages[0]['role'] != 'system' %}
{{- '<|im_start|>system\\nYou are helpful. Today is ' + (day or 'unknown') + '.<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(users=0) %}
{%- for message in messages %}
  {%- if message.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + message.role) }}
  {%- endif %}
  {%- if message.role == 'user' %}{% set ns.users = ns.users + 1 %}{% endif %}
  {%- if loop.index > 8 %}{% break %}{% endif %}
  {{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{% if not enable_thinking | default(true) %}
{{- '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}{{- eos_token if ns.users == 0 else '' }}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi é ✓"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " x "},
     {"role": "assistant", "content": "y"}, {"role": "user", "content": "<b>z</b>"}],
    [{"role": "system", "content": "only a system turn"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False, "day": "Monday"},
                                    {"tools": [{"name": "f", "description": "<é>"}]}])
def test_chat_template_renders_like_transformers(messages, kwargs):
    ours = ChatTemplate(QWENISH, {"eos_token": "<|im_end|>"}).render(messages, add_generation_prompt=True, **kwargs)
    theirs = render_jinja_template([messages], chat_template=QWENISH, add_generation_prompt=True,
                                   eos_token="<|im_end|>", **kwargs)[0][0]
    assert ours == theirs


def test_chat_template_errors_and_sources(tmp_path):
    with pytest.raises(ChatTemplateError, match="bad role tool"):
        ChatTemplate(QWENISH).render([{"role": "tool", "content": "x"}])
    assert ChatTemplate.from_dir(tmp_path) is None
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ bos_token }}"}]
    config = {"chat_template": named, "bos_token": {"content": "<s>", "lstrip": False}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert ChatTemplate.from_dir(tmp_path).render([]) == "D<s>"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")  # the .jinja file wins
    assert ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "a"}]) == "J1"


def test_incremental_text_is_the_full_decode(model_dir):
    """Random ids (half-characters, special tokens and all): the deltas add up to decode(all ids)."""
    tok = Tokenizer.from_dir(model_dir)
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(512) for _ in range(rng.randint(1, 30))]
        detok, streamed = IncrementalDetokenizer(tok.decode), ""
        for i in ids:
            detok.add([i])
            streamed += detok.take()
        detok.finish()
        assert streamed + detok.take(final=True) == tok.decode(ids) == detok.text


def test_stop_strings_are_cut_and_held_back():
    pieces = ["Hel", "lo, wo", "rld", "!!"]
    detok = IncrementalDetokenizer(lambda ids: "".join(pieces[i] for i in ids), stop=["o, w", "ld!", "zzz"])
    detok.add([0])
    assert detok.take() == "He"  # "l" may become "ld!": held back
    detok.add([1])
    assert (detok.text, detok.stopped, detok.take()) == ("Hell", True, "ll")  # "o, w" found across the delta

    detok = IncrementalDetokenizer(lambda ids: "".join(pieces[i] for i in ids), stop=["ld!"])
    detok.add([0, 1, 2])
    assert detok.take() == "Hello, wor"  # "ld" may become "ld!": held back
    detok.add([3])
    assert (detok.take(), detok.stopped) == ("", True) and detok.text == "Hello, wor"
    detok.add([0])  # after a stop, more tokens change nothing
    assert detok.text == "Hello, wor" and detok.ids == [0, 1, 2, 3]
