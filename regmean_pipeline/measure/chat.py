"""Chat data as its users have it: conversations rendered by the tokenizer's own chat template, and
which of the tokens are the assistant's (the response)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from regmean_pipeline.errors import RegMeanError

# The block a chat template wraps the assistant's text in, so apply_chat_template can return its mask.
GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
RESPONSE_FROM_TEMPLATE = "template assistant mask"
RESPONSE_FROM_PROMPT = "rendered prompt length"


def check_messages(value, where: str) -> list[dict]:
    """A conversation: a list of {"role": str, "content": str}; anything else is one line naming ``where``."""
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise RegMeanError(f"{where}: messages must be a list of {{\"role\", \"content\"}} objects, "
                           f"not {type(value).__name__}")
    for number, message in enumerate(value, start=1):
        if not isinstance(message, Mapping):
            raise RegMeanError(f"{where}: message {number} is {type(message).__name__}, not an object with "
                               "'role' and 'content'")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                problem = "has no" if message.get(key) is None else "has a non-text"
                raise RegMeanError(f"{where}: message {number} {problem} {key!r}")
    return [{"role": message["role"], "content": message["content"]} for message in value]


def template_source(tokenizer) -> str:
    """Where a tokenizer's chat template would be, for messages."""
    return f"{getattr(tokenizer, 'name_or_path', '') or '<tokenizer>'}/tokenizer_config.json"


@dataclass
class Encoded:
    """One conversation's token ids and, per token, whether it is the assistant's."""

    ids: list[int]
    response: list[int]


class ChatEncoder:
    """Token ids exactly as ``tokenizer.apply_chat_template(messages, tokenize=True)`` gives them (the
    template's own special tokens, nothing added), with the assistant's tokens marked.

    The mark comes from the template's ``{% generation %}`` blocks where it has them; otherwise each
    assistant message spans from the end of the conversation before it rendered with the generation
    prompt to the end of the conversation up to it (the rendered prompt's length).
    """

    def __init__(self, tokenizer):
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise RegMeanError(f"{template_source(tokenizer)}: the tokenizer has no chat template (no chat_template "
                               "there and no chat_template.jinja beside it); chat data needs one")
        self.tokenizer = tokenizer
        text = template if isinstance(template, str) else json.dumps(template)
        self.marks_generation = bool(GENERATION_BLOCK.search(text))

    @property
    def response_source(self) -> str:
        return RESPONSE_FROM_TEMPLATE if self.marks_generation else RESPONSE_FROM_PROMPT

    def render(self, messages: list[dict], *, generation_prompt: bool = False) -> list[int]:
        if not messages:
            return []
        return list(self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                       add_generation_prompt=generation_prompt)["input_ids"])

    def encode(self, conversations: list[list[dict]]) -> list[Encoded]:
        if not conversations:
            return []
        out = self.tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=self.marks_generation)
        if self.marks_generation:
            return [Encoded(list(ids), list(mask)) for ids, mask in zip(out["input_ids"], out["assistant_masks"])]
        return [Encoded(list(ids), self._response_by_prompt_length(messages, list(ids)))
                for messages, ids in zip(conversations, out["input_ids"])]

    def _response_by_prompt_length(self, messages: list[dict], ids: list[int]) -> list[int]:
        mask = [0] * len(ids)
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:index], generation_prompt=True)
            through = self.render(messages[:index + 1])
            if ids[:len(prompt)] != prompt or ids[:len(through)] != through:
                raise RegMeanError(
                    f"{template_source(self.tokenizer)}: the chat template renders the conversation before "
                    f"message {index + 1} differently on its own than inside the whole conversation, so the "
                    "assistant's tokens cannot be found by the prompt's length; use a template with "
                    "{% generation %} blocks, or --tokens all")
            mask[len(prompt):len(through)] = [1] * (len(through) - len(prompt))
        return mask

    def split_last_response(self, messages: list[dict], where: str) -> tuple[list[int], str]:
        """An encoder-decoder's view: the conversation before the last message (rendered with the
        generation prompt) is the source; the last message, the assistant's, is the target text."""
        if not messages or messages[-1]["role"] != "assistant":
            raise RegMeanError(f"{where}: the last message must be the assistant's (the encoder-decoder's target)")
        return self.render(messages[:-1], generation_prompt=True), messages[-1]["content"]
