"""`afm chat`: a terminal chat with a checkpoint, streaming, with history and a system prompt."""

from __future__ import annotations

import sys
from typing import TextIO

from afm.engine import LLM, SamplingParams

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /quit"


def chat_loop(llm: LLM, params: SamplingParams, system: str | None = None,
              stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    history: list[dict[str, str]] = []
    print(f"afm chat. {HELP}", file=stdout, flush=True)
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            print(file=stdout)
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            history.clear()
            print("(conversation reset)", file=stdout, flush=True)
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            history.clear()
            print(f"(system prompt {'set' if system else 'cleared'}; conversation reset)", file=stdout, flush=True)
            continue
        if text.startswith("/"):
            print(HELP, file=stdout, flush=True)
            continue
        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        prompt = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if len(prompt) >= llm.engine.max_model_len:
            history.pop()
            print("(the conversation no longer fits the context: /reset to start over)", file=stdout, flush=True)
            continue
        room = llm.engine.max_model_len - len(prompt)
        request = params.clone(max_tokens=min(params.max_tokens or room, room))
        print("afm> ", end="", file=stdout, flush=True)
        answer = ""
        for out in llm.stream(prompt, request):
            piece = out.outputs[0].delta_text
            answer += piece
            print(piece, end="", file=stdout, flush=True)
        print(file=stdout, flush=True)
        history.append({"role": "assistant", "content": answer})
