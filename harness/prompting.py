"""The model-side prompt: the task's text wrapped in the model's chat template, image first.

Tasks produce only the protocol text (docs/protocols.md); where the image goes and how the
conversation is framed belong to the model, so both come from its processor's chat template
(LLaVA-1.5: ``USER: <image>\\n{text} ASSISTANT:``).
"""

from __future__ import annotations


def chat_prompt(processor, text: str, with_image: bool = True) -> str:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)
