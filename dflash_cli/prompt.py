"""Turn what the user typed into prompt token ids: the model's chat template, or raw text."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import DflashError
from .harmony import HarmonyTokens
from .reasoning import CLOSE, OPEN


@dataclass
class ChatPrompt:
    ids: list[int]
    # How the answer starts: "off" (no reasoning), "auto" (reasoning if it opens with <think>), "open"
    # (the prompt opened <think> itself, as Qwen3.5's template does: the answer starts as reasoning), or
    # "harmony" (gpt-oss: the answer is harmony messages, split by token id: harmony.py).
    think: str = "off"
    # Tokens of `ids` the next turn's prompt will share: the conversation before this turn's generation
    # prompt. A target whose state cannot roll back (a hybrid) keeps a snapshot there.
    keep_prefix: int | None = None


def render_chat(tokenizer, messages: list[dict], *, enable_thinking: bool = False, tools: list[dict] | None = None,
                template_kwargs: dict | None = None) -> ChatPrompt:
    """Apply the checkpoint's chat template. A tokenizer without a template gets the messages' text, raw."""
    if not getattr(tokenizer, "chat_template", None):
        return ChatPrompt(encode_raw(tokenizer, "\n".join(m["content"] for m in messages)))
    kwargs = dict(tools=tools, tokenize=False, **(template_kwargs or {}), enable_thinking=enable_thinking)
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        head = tokenizer.apply_chat_template(messages, add_generation_prompt=False, **kwargs)
    except Exception as e:  # a Jinja error in a third-party template, or its own raise_exception
        raise DflashError(f"the model's chat template failed: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    # The template already spells out BOS and the role markers.
    ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
    keep = None
    if text.startswith(head):
        head_ids = tokenizer.encode(head, add_special_tokens=False, verbose=False)
        keep = len(head_ids) if ids[:len(head_ids)] == head_ids else None
    if text.endswith("<|start|>assistant") and HarmonyTokens.of(tokenizer) is not None:
        return ChatPrompt(ids, "harmony", keep)
    opens = text.rfind(OPEN) > text.rfind(CLOSE)
    return ChatPrompt(ids, "open" if opens else "auto" if enable_thinking else "off", keep)


def encode_chat(tokenizer, messages: list[dict], *, enable_thinking: bool = False) -> list[int]:
    return render_chat(tokenizer, messages, enable_thinking=enable_thinking).ids


def encode_raw(tokenizer, text: str) -> list[int]:
    # verbose=False: a prompt over the model's length is our one-line error, not transformers' warning
    return tokenizer.encode(text, add_special_tokens=True, verbose=False)
