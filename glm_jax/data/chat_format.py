"""Conversations as token ids: the ChatGLM3 and GLM-4 chat formats, the tool prompt and tool calls.

Both formats (docs/chat.md has the references and worked examples) start with
[gMASK] <sop> and write every message as

    <|role|>{metadata}\\n{content}

where <|role|> is one special token (system, user, assistant, observation),
metadata is empty except on an assistant message that calls a tool (the tool's
name), and the text is encoded WITHOUT recognising special tokens, so a user who
types "<|assistant|>" cannot forge a turn (THUDM's tokenizers do the same:
SentencePiece ids for ChatGLM3, `disallowed_special=()` for GLM-4). The prompt for
a reply ends with the <|assistant|> token; generation stops at the end of text,
<|user|> or <|observation|>.

The formats differ in four places:
  tool list      ChatGLM3: one system message "Answer the following questions ...:\\n" + the
                 functions as JSON (indent 4); GLM-4: a system message with its fixed preamble
                 and one "## name" block per function.
  call body      ChatGLM3: ```python\\ntool_call(a=1, b='x')\\n```; GLM-4: the arguments as JSON.
  empty message  ChatGLM3 writes it; GLM-4 leaves it out.
  last token     what closes a training conversation: ChatGLM3 the end of text (</s>),
                 GLM-4 <|user|>.

Training (THUDM's fine-tuning scripts of both models): a position is trained iff
its token belongs to an assistant message, so the model learns everything after
<|assistant|> (the metadata line, the reply) and the token that follows the reply
(the next role token or the conversation's last token), which is how a reply ends.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from typing import Callable

import numpy as np

from glm_jax.data.objectives import causal

ROLES = ("system", "user", "assistant", "observation")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
FORMATS = ("chatglm3", "glm4")

CHATGLM3_TOOL_PREFIX = "Answer the following questions as best as you can. You have access to the following tools:\n"
# glm-4-9b-chat's chat_template (tokenizer_config.json); THUDM's earlier tokenization_chatglm.py said
# "GLM-4" for "ChatGLM" and had no "# 可用工具" heading (docs/chat.md).
GLM4_TOOL_PREAMBLE = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                      "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具")
GLM4_FUNCTION_SUFFIX = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
CALL_FENCE = ("```python\n", "\n```")
CALL_NAME = "tool_call"


class ConversationError(ValueError):
    """A conversation that breaks the format's rules (the message says which message and why)."""


class ToolCallError(ValueError):
    """Generated text that should be a tool call but does not parse as one."""


@dataclasses.dataclass(frozen=True)
class Message:
    """One turn. An assistant message with `tool_call` ({'name', 'arguments'}) calls a tool: it is
    written as metadata = name, content = the format's call body. `loss=False` leaves an assistant
    message out of the training loss (ChatGLM3's `loss` key)."""

    role: str
    content: str = ""
    metadata: str = ""
    tool_call: dict | None = None
    loss: bool = True


@dataclasses.dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    tools: tuple[dict, ...] = ()  # function descriptions: {'name', 'description', 'parameters'}


# ------------------------------------------------------------------ reading conversations
def parse_conversation(record, where: str = "conversation", *, needs_reply: bool = False) -> Conversation:
    """A JSON object -> Conversation, checked (ConversationError names `where` and the message).

    {"tools": [...], "conversations": [...]} (ChatGLM3's fine-tuning files; "messages" works too),
    or a bare list of messages. A message is {"role", "content", "metadata"?, "tool_call"?, "loss"?};
    ChatGLM3's {"role": "tool", "name", "parameters", "observation"} becomes its assistant call
    and the observation. needs_reply: a training conversation (check_order).
    """
    if isinstance(record, list):
        record = {"conversations": record}
    if not isinstance(record, dict):
        raise ConversationError(f"{where}: expected an object with 'conversations' (or a list of messages), "
                                f"got {type(record).__name__}")
    messages = record.get("conversations", record.get("messages"))
    if not isinstance(messages, list):
        raise ConversationError(f"{where}: no 'conversations' (or 'messages') list of messages")
    tools = record.get("tools") or []
    if not isinstance(tools, list):
        raise ConversationError(f"{where}: 'tools' must be a list of function descriptions")
    parsed: list[Message] = []
    for k, item in enumerate(messages):
        parsed.extend(_parse_message(item, f"{where}, message {k}"))
    conversation = Conversation(tuple(parsed), tuple(_unwrap_tool(t, f"{where}, tools") for t in tools))
    check_order(conversation, where, needs_reply=needs_reply)
    return conversation


def _parse_message(item, where: str) -> list[Message]:
    if not isinstance(item, dict) or "role" not in item:
        raise ConversationError(f"{where}: a message is an object with a 'role'; got {str(item)[:80]!r}")
    role = item["role"]
    if role == "tool":  # ChatGLM3 fine-tuning data: the call and its result in one item
        call = {"name": item.get("name"), "arguments": item.get("parameters", {})}
        observation = item.get("observation", "")
        observation = observation if isinstance(observation, str) else json.dumps(observation, ensure_ascii=False)
        return [Message("assistant", tool_call=_check_call(call, where)), Message("observation", observation)]
    if role not in ROLES:
        raise ConversationError(f"{where}: unknown role {role!r}; roles are {list(ROLES)} (and ChatGLM3's 'tool')")
    content = item.get("content", "")
    if not isinstance(content, str):
        raise ConversationError(f"{where}: content must be text, got {type(content).__name__}")
    call = item.get("tool_call")
    if call is not None and role != "assistant":
        raise ConversationError(f"{where}: only an assistant message can carry a tool_call, not {role!r}")
    return [Message(role, content, str(item.get("metadata") or ""), _check_call(call, where) if call else None,
                    bool(item.get("loss", True)))]


def _check_call(call, where: str) -> dict:
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        raise ConversationError(f"{where}: a tool call needs a 'name' (text) and 'arguments' (an object)")
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            raise ConversationError(f"{where}: tool call arguments are not JSON ({error})") from None
    if not isinstance(arguments, dict):
        raise ConversationError(f"{where}: tool call arguments must be an object of name -> value")
    return {"name": call["name"], "arguments": arguments}


def _unwrap_tool(tool, where: str) -> dict:
    """A function description; OpenAI / GLM-4 style {'type': 'function', 'function': {...}} is unwrapped."""
    if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict):
        tool = tool["function"]
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        raise ConversationError(f"{where}: a tool is a function description with a 'name' "
                                f"(and 'description', 'parameters'); got {str(tool)[:80]!r}")
    return tool


def check_order(conversation: Conversation, where: str = "conversation", *, needs_reply: bool = False) -> None:
    """The turn rules of ChatGLM3's PROMPT.md: system first, an assistant turn only after a user turn,
    an observation only right after a tool call. needs_reply: at least one assistant turn (training)."""
    seen_user = seen_other = False
    previous: Message | None = None
    for k, message in enumerate(conversation.messages):
        at = f"{where}, message {k}"
        if message.role == "system" and seen_other:
            raise ConversationError(f"{at}: a system message must come before every other message")
        if message.role == "assistant" and not seen_user:
            raise ConversationError(f"{at}: an assistant turn needs a user turn before it")
        if message.role == "observation" and not _is_call(previous):
            raise ConversationError(f"{at}: a tool result (observation) without a tool call right before it; "
                                    "the assistant message before it must have a tool_call (or metadata naming "
                                    "the tool)")
        seen_user |= message.role == "user"
        seen_other |= message.role != "system"
        previous = message
    if needs_reply and not any(m.role == "assistant" for m in conversation.messages):
        raise ConversationError(f"{where}: the assistant turn is missing; a training conversation needs at least "
                                "one assistant message to learn from")


def _is_call(message: Message | None) -> bool:
    return message is not None and message.role == "assistant" and bool(message.tool_call or message.metadata)


# ------------------------------------------------------------------ the two formats
@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """How one model family writes conversations (see the module docstring)."""

    name: str
    tool_system: Callable[[tuple[dict, ...]], str]
    call_body: Callable[[dict], str]
    parse_call_body: Callable[[str], dict]
    writes_empty_messages: bool
    closing_role: str | None  # the role token that closes a training conversation (None: end of text)

    def message_texts(self, conversation: Conversation) -> list[tuple[str, str, str, bool]]:
        """(role, metadata, content, trained) of every message written, tool list included."""
        written = []
        if conversation.tools:
            written.append(("system", "", self.tool_system(conversation.tools), False))
        for m in conversation.messages:
            metadata, content = m.metadata, m.content
            if m.tool_call is not None:
                metadata, content = m.tool_call["name"], self.call_body(m.tool_call["arguments"])
            if content or metadata or self.writes_empty_messages:
                written.append((m.role, metadata, content, m.role == "assistant" and m.loss))
        return written

    def render(self, conversation: Conversation, add_generation_prompt: bool = False) -> str:
        """The conversation as text, special tokens written out (what the reference templates print)."""
        text = "[gMASK]<sop>" + "".join(f"{ROLE_TOKENS[r]}{meta}\n{content}"
                                         for r, meta, content, _ in self.message_texts(conversation))
        return text + (ROLE_TOKENS["assistant"] if add_generation_prompt else "")

    def parse_reply(self, text: str) -> tuple[str, dict | None]:
        """Generated text after <|assistant|> -> (reply text, tool call or None).

        The first line is the metadata: empty for a plain reply (returned stripped, as THUDM's
        chat does), a tool name for a call whose body follows. Raises ToolCallError when a call's
        body does not parse.
        """
        metadata, _, body = text.partition("\n")
        if not metadata.strip():
            return body.strip(), None
        return body, {"name": metadata.strip(), "arguments": self.parse_call_body(body)}


def _chatglm3_tools(tools: tuple[dict, ...]) -> str:
    return CHATGLM3_TOOL_PREFIX + json.dumps(list(tools), indent=4, ensure_ascii=False)


def _chatglm3_call(arguments: dict) -> str:
    keywords = [ast.keyword(arg=name, value=ast.Constant(value)) for name, value in arguments.items()]
    call = ast.Call(func=ast.Name(id=CALL_NAME), args=[], keywords=keywords)
    return CALL_FENCE[0] + ast.unparse(call) + CALL_FENCE[1]


def _chatglm3_parse_call(body: str) -> dict:
    """```python\\ntool_call(a=1, b='x')\\n``` -> {'a': 1, 'b': 'x'}: Python literals only, never run."""
    code = body.strip()
    if code.startswith("```"):
        code = code.split("\n", 1)[1] if "\n" in code else ""
        code = code.rsplit("```", 1)[0]
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except SyntaxError as error:
        raise ToolCallError(f"the tool call is not Python: {error.msg} in {code.strip()[:120]!r}") from None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == CALL_NAME
            and not call.args):
        raise ToolCallError(f"a tool call is written {CALL_NAME}(name=value, ...); got {code.strip()[:120]!r}")
    try:
        return {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg}
    except ValueError:
        raise ToolCallError(f"tool call arguments must be literals (numbers, text, lists, dicts); got "
                            f"{code.strip()[:120]!r}") from None


def _glm4_tools(tools: tuple[dict, ...]) -> str:
    blocks = "".join(f"\n\n## {t['name']}\n\n{json.dumps(t, ensure_ascii=False, indent=4)}{GLM4_FUNCTION_SUFFIX}"
                     for t in tools)
    return GLM4_TOOL_PREAMBLE + blocks


def _glm4_call(arguments: dict) -> str:
    return json.dumps(arguments, ensure_ascii=False)


def _glm4_parse_call(body: str) -> dict:
    try:
        arguments = json.loads(body.strip())
    except json.JSONDecodeError as error:
        raise ToolCallError(f"the tool call arguments are not JSON ({error.msg}): {body.strip()[:120]!r}") from None
    if not isinstance(arguments, dict):
        raise ToolCallError(f"the tool call arguments must be a JSON object; got {body.strip()[:120]!r}")
    return arguments


CHAT_FORMATS = {
    "chatglm3": ChatFormat("chatglm3", _chatglm3_tools, _chatglm3_call, _chatglm3_parse_call,
                           writes_empty_messages=True, closing_role=None),
    "glm4": ChatFormat("glm4", _glm4_tools, _glm4_call, _glm4_parse_call,
                       writes_empty_messages=False, closing_role="user"),
}


def chat_format(name: str) -> ChatFormat:
    if name not in CHAT_FORMATS:
        raise ValueError(f"chat format {name!r} is unknown; use one of {list(CHAT_FORMATS)}")
    return CHAT_FORMATS[name]


# ------------------------------------------------------------------ token ids
def role_ids(tokenizer) -> dict[str, int]:
    """role -> id of its token. The tokenizer must have all four (glm_jax.chat adds them to its own)."""
    ids = {role: tokenizer.special_id(token) for role, token in ROLE_TOKENS.items()}
    missing = [ROLE_TOKENS[r] for r, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"the tokenizer has no {missing} tokens, which chat formats need; fine-tuning on a "
                         "'chat:' data source adds them (glm_jax.data.chat_format.with_role_tokens), and imported "
                         "ChatGLM3 / GLM-4 tokenizers have them")
    return ids


def with_role_tokens(tokenizer, model_vocab_size: int | None = None):
    """The tokenizer with the four role tokens (added as specials where missing). model_vocab_size:
    the embedding rows of the model that will read the ids; a ValueError if they do not fit."""
    grown = tokenizer.with_specials(ROLE_TOKENS.values())
    if model_vocab_size is not None and grown.vocab_size > model_vocab_size:
        raise ValueError(f"adding the chat role tokens {list(ROLE_TOKENS.values())} makes the tokenizer "
                         f"{grown.vocab_size} ids long, but the model's embedding table has {model_vocab_size} rows; "
                         "fine-tune a model with a larger ModelConfig.vocab_size (THUDM's checkpoints pad theirs), or "
                         "use a tokenizer that has room (glm_jax's own reserve pieces for this)")
    return grown


def stop_ids(tokenizer) -> tuple[int, ...]:
    """What ends a generated reply: the end of text, <|user|>, <|observation|> (both models' stop list)."""
    roles = role_ids(tokenizer)
    return (tokenizer.specials.eos, roles["user"], roles["observation"])


def encode_conversation(fmt: ChatFormat, conversation: Conversation, tokenizer,
                        add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(ids, trained) int32 / bool [n]: the conversation's tokens and which belong to assistant messages.

    With add_generation_prompt the ids end with <|assistant|> (a prompt for the next reply);
    otherwise they end with the format's closing token (a training conversation).
    """
    roles = role_ids(tokenizer)
    ids, trained = list(_prefix(tokenizer)), [False, False]
    for role, metadata, content, is_trained in fmt.message_texts(conversation):
        piece = [roles[role], *tokenizer.encode_plain(metadata + "\n"), *tokenizer.encode_plain(content)]
        ids += piece
        trained += [is_trained] * len(piece)
    last = roles["assistant"] if add_generation_prompt else (
        roles[fmt.closing_role] if fmt.closing_role else tokenizer.specials.eos)
    ids.append(last)
    trained.append(False)
    return np.asarray(ids, np.int32), np.asarray(trained, bool)


def _prefix(tokenizer) -> tuple[int, int]:
    return (tokenizer.specials.gmask, tokenizer.specials.sop)


def training_example(fmt: ChatFormat, conversation: Conversation, tokenizer, prompt_attention: str = "causal") -> dict:
    """One SFT example in the batch contract's per-example form (as the objectives return it).

    tokens = ids[:-1], targets = ids[1:] (pre-aligned), loss_mask = 1 where the input token is part
    of an assistant message. prompt_attention 'prefix' makes everything up to and including the
    first <|assistant|> a bidirectional prefix (GLM's Part A); 'causal' (the reference models) none.
    """
    if prompt_attention not in PROMPT_ATTENTION:
        raise ValueError(f"chat prompt attention {prompt_attention!r} is unknown; use one of {PROMPT_ATTENTION}")
    ids, trained = encode_conversation(fmt, conversation, tokenizer)
    example = causal(ids)  # the plain next-token example; chat only changes which positions train
    example["loss_mask"] = trained[:-1].astype(np.float32)
    example["sep"] = prompt_prefix_length(trained) if prompt_attention == "prefix" else 0
    return example


PROMPT_ATTENTION = ("causal", "prefix")


def prompt_prefix_length(trained: np.ndarray) -> int:
    """Tokens up to and including the first assistant message's role token (all, if it has none)."""
    first = np.flatnonzero(trained)
    return int(first[0]) + 1 if len(first) else len(trained)
