"""Turn what the user typed into prompt token ids: the model's chat template, or raw text."""
from __future__ import annotations

from .errors import DflashError


def encode_chat(tokenizer, messages: list[dict], *, enable_thinking: bool = False) -> list[int]:
    """Apply the checkpoint's chat template (Qwen3 thinking off by default: the b16 drafters were
    trained without it). A tokenizer without a template gets the messages' text, raw."""
    if not getattr(tokenizer, "chat_template", None):
        return encode_raw(tokenizer, "\n".join(m["content"] for m in messages))
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=enable_thinking)
    except Exception as e:  # a Jinja error in a third-party template
        raise DflashError(f"the model's chat template failed: {str(e).splitlines()[0]}") from None
    # The template already spells out BOS and the role markers.
    return tokenizer.encode(text, add_special_tokens=False, verbose=False)


def encode_raw(tokenizer, text: str) -> list[int]:
    # verbose=False: a prompt over the model's length is our one-line error, not transformers' warning
    return tokenizer.encode(text, add_special_tokens=True, verbose=False)
