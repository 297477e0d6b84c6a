"""One place that turns a user message into the model's prompt, as text and as token ids.

Generation and evaluation (vLLM), training (DeepSpeed) and serving all call `prompt_ids`,
so the distilled model is trained on exactly the token ids it is later queried with.

`chat_template` is the job's `model.chat_template`: None uses the model's own template,
`RAW` ("none") sends the task prompt as it is, anything else is a Jinja template.
"""

from __future__ import annotations

RAW = "none"


class NoChatTemplate(ValueError):
    """The model folder has no chat template and the job did not say what to use."""


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer, user_text: str, chat_template: str | None = None) -> str:
    if chat_template == RAW:
        return f"{user_text}\n"
    if chat_template is None and not has_chat_template(tokenizer):
        raise NoChatTemplate(
            "the model has no chat template: set model.chat_template to a Jinja template, "
            "or to none to send raw prompts on purpose"
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], chat_template=chat_template, tokenize=False, add_generation_prompt=True
    )


def prompt_ids(tokenizer, user_text: str, chat_template: str | None = None) -> list[int]:
    """The prompt's token ids. A chat template writes the model's special tokens itself
    (Llama-2-chat's writes `bos_token`), so its text is tokenized without the tokenizer's
    own: with them, a tokenizer that adds BOS (Llama-2's does) would start every prompt
    with two (vLLM's chat path turns them off for the same reason). A raw prompt gets the
    tokenizer's special tokens, as the model saw them in pre-training."""
    text = chat_prompt(tokenizer, user_text, chat_template)
    return tokenizer.encode(text, add_special_tokens=chat_template == RAW)


def prompt_ids_many(tokenizer, user_texts: list[str], chat_template: str | None = None) -> list[list[int]]:
    """`prompt_ids` of several texts in one tokenizer call (the same ids: no padding, no
    truncation); a fast tokenizer encodes the batch in one call into Rust, without the
    per-call overhead that dominates for short prompts."""
    if not user_texts:
        return []
    texts = [chat_prompt(tokenizer, t, chat_template) for t in user_texts]
    return list(tokenizer(texts, add_special_tokens=chat_template == RAW)["input_ids"])


def leading_bos(ids: list[int], bos_id: int | None) -> int:
    """How many BOS tokens a prompt starts with (`s2d check`, the boundary tests)."""
    n = 0
    while bos_id is not None and n < len(ids) and ids[n] == bos_id:
        n += 1
    return n
