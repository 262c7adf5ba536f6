"""The prompt token ids vLLM's OpenAI server makes of a request body, computed with the model's own tokenizer.

What vLLM 0.32 does, and so what this does:
- /v1/completions: a text prompt is ``tokenizer(prompt, add_special_tokens=body.get("add_special_tokens", True))``;
  a prompt of token ids is used as is.
- /v1/chat/completions: the messages are normalised (a text-parts content list becomes the texts joined by "\\n",
  or, for chat templates that loop over message contents, a list of ``{"type": "text", "text": ...}`` parts; the
  message holds only role and content), rendered with the chat template (``add_generation_prompt`` default True,
  ``continue_final_message``, ``documents``, ``reasoning_effort``, ``tools``, ``chat_template`` and
  ``chat_template_kwargs`` from the body), and the text tokenized with ``add_special_tokens`` default False.

Requests this cannot reproduce (images or audio in the messages, tool calls, prompt embeddings) give None: the
caller then knows it has no exact tokens. A tokenization that differs from the engine's never claims cached
blocks that are not there (matches come from the engine's own token ids), it only misses some.
"""
from __future__ import annotations

from typing import Any


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def _loops_over_content(template: str) -> bool:
    """vLLM's "openai" chat-template content format, detected as vLLM does in the common case: the template has a
    for loop over ``message.content``, ``message['content']`` or a variable named ``content``."""
    import jinja2
    from jinja2 import nodes

    try:
        ast = jinja2.Environment().parse(template)
    except jinja2.TemplateError:
        return False
    for loop in ast.find_all(nodes.For):
        it = loop.iter
        if isinstance(it, nodes.Name) and it.name == "content":
            return True
        if isinstance(it, nodes.Getattr) and it.attr == "content":
            return True
        if isinstance(it, nodes.Getitem) and isinstance(it.arg, nodes.Const) and it.arg.value == "content":
            return True
    return False


class PromptTokenizer:
    """``PromptTokenizer(path)``: the Hugging Face tokenizer in ``path`` (a model directory, or a hub name where
    the hub is reachable). ``tokens(body, endpoint)``: the prompt's token ids, or None where it cannot be
    reproduced; ValueError naming the field for a malformed body."""

    def __init__(self, path: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ValueError(f"tokenizer: loading {path!r} needs the transformers package (pip install "
                             "transformers), or leave tokenizer unset to estimate prompts without it") from None
        try:
            self._tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:  # transformers raises OSError, ValueError, KeyError... for unusable directories
            raise ValueError(f"tokenizer: cannot load a tokenizer from {path!r}: {type(e).__name__}: {e}") from None
        self.path = str(path)
        template = getattr(self._tok, "chat_template", None)
        self._default_openai_format = isinstance(template, str) and _loops_over_content(template)

    def tokens(self, body: dict, endpoint: str) -> list[int] | None:
        if endpoint == "chat":
            return self._chat(body)
        if endpoint == "completions":
            return self._completion(body)
        raise ValueError(f"endpoint: expected 'completions' or 'chat', got {endpoint!r}")

    def _completion(self, body: dict) -> list[int] | None:
        if "prompt_embeds" in body:
            return None
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if _is_token_ids(prompt):
            return list(prompt)
        if not isinstance(prompt, str):
            raise ValueError("prompt: expected a string, a list of token ids, or a one-element list of either")
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise ValueError("add_special_tokens: expected true or false")
        return list(self._tok(prompt, add_special_tokens=special)["input_ids"])

    def _chat(self, body: dict) -> list[int] | None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages: expected a non-empty list of {role, content} objects")
        template = body.get("chat_template")
        openai_format = _loops_over_content(template) if isinstance(template, str) else self._default_openai_format
        conversation = []
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ValueError(f"messages[{k}]: expected an object with a string role")
            if m.get("tool_calls") or m["role"] == "tool":
                return None  # vLLM reshapes tool calls and tool results before templating
            texts = self._texts(m.get("content"), k)
            if texts is None:
                return None
            if openai_format:
                conversation.append({"role": m["role"], "content": [{"type": "text", "text": t} for t in texts]})
            else:
                conversation.append({"role": m["role"], "content": "\n".join(texts)})
        user_kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(user_kwargs, dict):
            raise ValueError("chat_template_kwargs: expected an object")
        effort = body.get("reasoning_effort")
        ours = {"add_generation_prompt": body.get("add_generation_prompt", True),
                "continue_final_message": body.get("continue_final_message", False),
                "documents": body.get("documents"), "reasoning_effort": effort}
        if effort is not None and "enable_thinking" not in user_kwargs:
            ours["enable_thinking"] = effort != "none"
        # vLLM's merge: the request's chat_template_kwargs, overridden by the set (not None/"auto") fields above.
        kwargs = {**user_kwargs, **{k: v for k, v in ours.items() if v is not None and v != "auto"}}
        try:
            text = self._tok.apply_chat_template(conversation, tools=body.get("tools"), chat_template=template,
                                                 tokenize=False, **kwargs)
        except Exception as e:  # the template refused the conversation: vLLM answers 400 too
            raise ValueError(f"messages: the chat template failed: {type(e).__name__}: {e}") from None
        special = body.get("add_special_tokens", False)
        if not isinstance(special, bool):
            raise ValueError("add_special_tokens: expected true or false")
        return list(self._tok(text, add_special_tokens=special)["input_ids"])

    @staticmethod
    def _texts(content: Any, k: int) -> list[str] | None:
        """The text parts of one message's content; None if it has parts other than text."""
        if content is None:
            return []
        if isinstance(content, str):
            return [content]
        if not isinstance(content, list):
            raise ValueError(f"messages[{k}].content: expected a string or a list of parts")
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                return None  # images, audio, files: the engine's multimodal processing decides their tokens
        return texts
