"""Chatting with a run: ChatGLM3 / GLM-4 conversations, tool calls, the terminal chat.

The formats and the fine-tuning data live in glm_jax.data (chat_format, chat_source);
this package holds what talks to a model: glm_jax.chat.session.ChatSession (history,
streaming, the tool loop) and glm_jax.chat.tools (Python functions a model may call).
Nothing is imported here, so `python -m glm_jax.chat` can choose the JAX platform
before JAX loads.
"""
