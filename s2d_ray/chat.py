"""One place that turns a user message into the model's prompt text.

Generation (vLLM) and training (DeepSpeed) both call `chat_prompt`, so the distilled
model is trained on exactly the prompt format it is later queried with.
"""

from __future__ import annotations


def chat_prompt(tokenizer, user_text: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
    return f"{user_text}\n"
