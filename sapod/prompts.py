"""Turning a question into the text a model is prompted with."""

from __future__ import annotations

from typing import Any

PLAIN_TEMPLATE = "{system}\n\nQuestion: {question}\nAnswer:"


def format_prompt(tokenizer: Any, question: str, system_prompt: str) -> str:
    """The tokenizer's chat template when it has one, a plain template otherwise."""
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": question},
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return PLAIN_TEMPLATE.format(system=system_prompt, question=question)
