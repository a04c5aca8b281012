"""Real chat templates on small in-process tokenizers, for the conversation tests.

``byte_tokenizer(specials)`` is a byte-level BPE without merges (every UTF-8 byte a token,
as GPT-2's alphabet writes it) plus the given special tokens, wrapped as a transformers
fast tokenizer: it gives character offsets, as the tokenizers of real models do. The
templates are the ones the model families ship (Llama 3 Instruct's, Qwen2.5 Instruct's
without its tool branch), set as ``tokenizer.chat_template``.
"""

from __future__ import annotations

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# A reasoning template in the style of Qwen3's: earlier assistant turns lose their
# <think> block once a later user turn follows, so turn-by-turn renderings are not prefixes.
DROPS_THINKING_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and not loop.last %}"
    "{{- '<|im_start|>assistant\\n' + message.content.split('</think>')[-1].lstrip() + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def byte_tokenizer(specials: tuple[str, ...], *, bos: str | None = None, eos: str, pad: str | None = None,
                   template: str | None = None):
    """A transformers fast tokenizer over UTF-8 bytes with ``specials`` as added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos,
                                        pad_token=pad or eos)
    tokenizer.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in (bos, eos, pad)]})
    tokenizer.chat_template = template
    return tokenizer


def llama3_tokenizer():
    return byte_tokenizer(LLAMA3_SPECIALS, bos="<|begin_of_text|>", eos="<|eot_id|>", template=LLAMA3_TEMPLATE)


def qwen25_tokenizer():
    return byte_tokenizer(CHATML_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>", template=QWEN25_TEMPLATE)


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Is the sky blue? é"},
    {"role": "assistant", "content": "Yes."},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Green, mostly."},
]


def expected_positions(tokenizer, ids, header: str, end_of_turn: str, which: str = "assistant") -> list[int]:
    """The positions a chat trainer must train, found independently of ``chat``: the tokens
    after each assistant header, through the next end-of-turn token."""
    header_ids = tokenizer(header, add_special_tokens=False)["input_ids"]
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    turns = []
    for start in range(len(ids) - len(header_ids) + 1):
        if ids[start:start + len(header_ids)] == header_ids:
            first = start + len(header_ids)
            last = ids.index(end_id, first)
            turns.append(list(range(first, last + 1)))
    if which == "last":
        turns = turns[-1:]
    return [p for turn in turns for p in turn]


def trained(labels) -> list[int]:
    return [i for i, label in enumerate(labels) if label != -100]
