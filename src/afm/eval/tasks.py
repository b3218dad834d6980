"""Task files from local data: JSONL records and lm-evaluation-harness YAML configs.

Multiple-choice JSONL, one question per line (ARC / HellaSwag / MMLU style, lm-eval's field names):

    {"query": "Question: ...\\nAnswer:", "choices": ["...", "..."], "gold": 1}

The context is `context`, `query` or `question`; the gold index is `gold`, `label` or `answer` (an
integer, a digit string, or the text of one choice). ARC's own layout also works: `choices` as
{"text": [...], "label": ["A", ...]} with `answerKey`. Each choice is scored as `" " + choice` after
the context (lm-eval's default `target_delimiter`), or with the record's own `target_delimiter`; choices
that all begin with whitespace already get none. A `lang` or `subject` field groups the accuracy.

Generative JSONL: `{"prompt": "..."} ` (plain text, continued by the model) or `{"messages": [...]}`
(a chat, answered through the chat template), with `answer` (a string, or a list of accepted ones)
and optionally `stop` (strings that end the output).

lm-eval YAML configs: the subset that describes a task over local JSON files, `dataset_path: json`
with `dataset_kwargs: {data_files: ...}`, `output_type` multiple_choice or generate_until, and
`doc_to_text` / `doc_to_choice` / `doc_to_target` each given as a field name, a literal (an index or
a list of choices), or a Jinja template rendered the way lm-eval renders it (undefined names are errors,
`regex_replace` is available, a rendered choice list is read as a Python literal). Also read:
`task`, `test_split` / `validation_split`, `target_delimiter`, `description`, `num_fewshot: 0`,
`generation_kwargs` (`until`, `max_gen_toks`). Python hooks (`!function`, `process_docs`,
`process_results`), `include`, few-shot examples and other datasets are refused with the reason.

Every error names the file and line and says what to change.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from afm.errors import AFMError
from afm.io import JSONLineError, iter_jsonl


class TaskFileError(AFMError):
    """A task file (JSONL or YAML) that cannot be read as a task."""


@dataclass
class MCQuestion:
    """One multiple-choice question; each choice is scored as `target_delimiter + choice`."""

    context: str
    choices: list[str]
    gold: int
    target_delimiter: str = " "
    where: str = ""  # file:line, for messages and samples
    group: str | None = None  # the record's `lang` or `subject`: accuracy is also reported per group


@dataclass
class GenQuestion:
    """One generative question: a text prompt or a chat, and the accepted answers."""

    answers: list[str]
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    stop: list[str] = field(default_factory=list)
    where: str = ""


@dataclass
class TaskData:
    name: str
    kind: Literal["multiple_choice", "generative"]
    questions: list[Any]
    source: str
    max_tokens: int | None = None  # the task's own output budget (YAML generation_kwargs.max_gen_toks)
    notes: list[str] = field(default_factory=list)


def _fail(where: str, problem: str, fix: str) -> TaskFileError:
    return TaskFileError(f"{where}: {problem}; {fix}")


# ---- JSON Lines -----------------------------------------------------------------------------------


def read_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(file:line, record) for every non-empty line of a .jsonl / .jsonl.gz file (or item of a .json array)."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"{path}: no such file; give the path of a .jsonl task file")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _fail(f"{path}:{getattr(e, 'lineno', 1)}", f"not valid JSON ({e})",
                        "write a JSON array of objects, or one object per line in a .jsonl file") from e
        if not isinstance(data, list):
            raise _fail(f"{path}:1", "a .json task file must hold an array of records", "write [ {...}, {...} ]")
        for i, record in enumerate(data):
            if not isinstance(record, dict):
                raise _fail(f"{path}: item {i}", "is not a JSON object", "make every item an object")
            yield f"{path}: item {i}", record
        return
    try:
        for where, record in iter_jsonl(path):
            if not isinstance(record, dict):
                raise _fail(where, f"is a JSON {type(record).__name__}, not an object", "each line must be one JSON object")
            yield where, record
    except JSONLineError as e:
        raise _fail(e.where, f"not valid JSON ({e.error.msg} at column {e.error.colno})",
                    "each line must be one JSON object") from e


def _first(record: dict[str, Any], keys: tuple[str, ...]) -> tuple[str | None, Any]:
    for k in keys:
        if k in record:
            return k, record[k]
    return None, None


def _gold_index(value: Any, choices: list[str], where: str, field_name: str,
                labels: list[str] | None = None) -> int:
    """An index into `choices` from an int, a digit string, a choice label (A, B, ...) or a choice's text."""
    if isinstance(value, bool):
        raise _fail(where, f"`{field_name}` is a boolean", "give the index of the right choice (0-based)")
    if isinstance(value, str):
        if labels and value in labels:
            return labels.index(value)
        if value.strip().isdigit():
            value = int(value.strip())
        elif value in choices:
            return choices.index(value)
        else:
            raise _fail(where, f"`{field_name}` {value!r} is neither an index nor one of the choices",
                        "give the 0-based index of the right choice")
    if not isinstance(value, int):
        raise _fail(where, f"`{field_name}` is a {type(value).__name__}", "give the 0-based index of the right choice")
    if not 0 <= value < len(choices):
        raise _fail(where, f"`{field_name}` {value} is out of range for {len(choices)} choices",
                    f"give an index from 0 to {len(choices) - 1}")
    return value


def _check_choices(choices: Any, where: str, what: str = "`choices`") -> list[str]:
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise _fail(where, f"{what} must be a list of strings, got {type(choices).__name__}",
                    'write "choices": ["first", "second", ...]')
    if len(choices) < 2:
        raise _fail(where, f"{what} has {len(choices)} choice(s)", "a multiple-choice question needs at least 2")
    return choices


def mc_question(record: dict[str, Any], where: str) -> MCQuestion:
    """A multiple-choice question from one JSONL record."""
    key, context = _first(record, ("context", "query", "question"))
    if key is None:
        raise _fail(where, "no context", 'give the question as "context", "query" or "question"')
    if not isinstance(context, str):
        raise _fail(where, f"`{key}` is a {type(context).__name__}", "make it a string")
    raw = record.get("choices")
    labels = None
    if isinstance(raw, dict) and "text" in raw:  # ARC's layout: {"text": [...], "label": ["A", ...]}
        labels = [str(x) for x in raw.get("label") or []] or None
        raw = raw["text"]
    choices = _check_choices(raw, where)
    gkey, gold = _first(record, ("gold", "label", "answer", "answerKey"))
    if gkey is None:
        raise _fail(where, "no gold answer", 'give the right choice\'s 0-based index as "gold", "label" or "answer"')
    delimiter = record.get("target_delimiter")
    if delimiter is None:
        # Choices written with their own leading space (" Paris") would otherwise be scored as "  Paris".
        delimiter = "" if all(c[:1].isspace() for c in choices) else " "
    elif not isinstance(delimiter, str):
        raise _fail(where, "`target_delimiter` must be a string", 'write "target_delimiter": " "')
    group = record.get("lang", record.get("subject"))
    return MCQuestion(context, choices, _gold_index(gold, choices, where, gkey, labels), delimiter, where,
                      None if group is None else str(group))


def _answers(value: Any, where: str, key: str) -> list[str]:
    if isinstance(value, list) and value and all(isinstance(v, str | int | float) for v in value):
        return [str(v) for v in value]
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return [str(value)]
    raise _fail(where, f"`{key}` must be a string or a list of strings", 'write "answer": "42"')


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
    if not ok:
        raise _fail(where, "`messages` must be a non-empty list of {\"role\": ..., \"content\": ...}",
                    "write the conversation up to the turn the model should answer")
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]  # a held-out file's reference reply: the model writes its own
        if not messages:
            raise _fail(where, "`messages` holds only an assistant turn", "start with the user's message")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def gen_question(record: dict[str, Any], where: str) -> GenQuestion:
    """A generative question from one JSONL record."""
    if "answer" not in record:
        raise _fail(where, "no `answer`", 'give the reference answer the verifier checks, e.g. "answer": "42"')
    answers = _answers(record["answer"], where, "answer")
    stop = record.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _fail(where, "`stop` must be a string or a list of non-empty strings", 'write "stop": ["\\n\\n"]')
    if "messages" in record:
        return GenQuestion(answers, messages=_check_messages(record["messages"], where), stop=stop, where=where)
    if isinstance(record.get("prompt"), str):
        return GenQuestion(answers, prompt=record["prompt"], stop=stop, where=where)
    raise _fail(where, "no `prompt` (a string) or `messages` (a chat)", "give the model's input as one of them")


def load_jsonl_task(path: str | Path, kind: Literal["multiple_choice", "generative"] | None = None,
                    limit: int | None = None, name: str | None = None) -> TaskData:
    """A JSONL task file; without `kind`, the first record decides (`choices` means multiple choice)."""
    questions: list[Any] = []
    for where, record in read_records(path):
        if kind is None:
            if "choices" in record:
                kind = "multiple_choice"
            elif "prompt" in record or "messages" in record:
                kind = "generative"
            else:
                raise _fail(where, f"cannot tell the task kind from the fields {sorted(record)}",
                            "multiple choice needs `choices`; generative tasks need `prompt` or `messages`")
        questions.append(mc_question(record, where) if kind == "multiple_choice" else gen_question(record, where))
        if limit is not None and len(questions) >= limit:
            break
    if not questions:
        raise TaskFileError(f"{path}: no records; write one JSON object per line")
    assert kind is not None
    return TaskData(name or Path(path).name, kind, questions, str(path))


# ---- lm-eval YAML ---------------------------------------------------------------------------------

# Keys that only affect lm-eval's bookkeeping or metrics afm computes itself.
_IGNORED = {"tag", "group", "dataset_name", "training_split", "fewshot_split", "fewshot_delimiter",
            "fewshot_config", "metadata", "should_decontaminate", "doc_to_decontamination_query",
            "repeats", "unsafe_code", "output_type", "task_alias", "group_alias"}
_REFUSED = {
    "include": "copy the included file's keys into this one",
    "process_docs": "pre-process the records into the JSON file instead",
    "process_results": "afm computes acc / acc_norm (multiple choice) and verified accuracy (generative)",
    "doc_to_image": "afm's models read text only",
    "doc_to_audio": "afm's models read text only",
    "custom_dataset": "use dataset_path: json with local data_files",
}
_KNOWN = {"task", "dataset_path", "dataset_kwargs", "test_split", "validation_split", "train_split",
          "doc_to_text", "doc_to_choice", "doc_to_target", "target_delimiter", "description", "num_fewshot",
          "generation_kwargs", "metric_list", "filter_list"}


def _regex_replace(s: str, pattern: str, repl: str, count: int = 0) -> str:
    return re.sub(pattern, repl, s, count=count)


@lru_cache(maxsize=256)
def _template(source: str) -> Any:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # lm-eval's environment: undefined names fail loudly and trailing newlines are kept. Task files may
    # come from anywhere, so templates run sandboxed.
    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = _regex_replace
    return env.from_string(source)


def _key_lines(text: str) -> dict[str, int]:
    """1-based line of each top-level key of a YAML mapping (for error messages)."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


@dataclass
class _Field:
    """One doc_to_* setting: a field name, a literal, or a Jinja template."""

    name: str
    spec: Any
    where: str  # yaml:line

    def renders(self, doc: dict[str, Any]) -> bool:
        """Whether the setting is a template for this record (not a field name or a literal)."""
        return isinstance(self.spec, str) and self.spec not in doc

    def apply(self, doc: dict[str, Any], doc_where: str) -> Any:
        spec = self.spec
        if isinstance(spec, str) and spec in doc:
            return doc[spec]
        if not isinstance(spec, str):
            return spec
        import jinja2

        try:
            return _template(spec).render(**doc)
        except jinja2.TemplateError as e:
            raise TaskFileError(f"{self.where}: {self.name} fails on the record at {doc_where} "
                                f"({type(e).__name__}: {e}); use the record's field names, e.g. "
                                f"{self.name}: \"{{{{{next(iter(doc), 'field')}}}}}\"") from e


def load_yaml_task(path: str | Path, limit: int | None = None) -> TaskData:
    """An lm-eval task config over local JSON data (the subset described in this module's docstring)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"{path}: no such file; give the path of an lm-eval task .yaml")
    text = path.read_text(encoding="utf-8")
    try:
        config = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else 1
        tag = "`!function`" if "!function" in str(e) else "a custom YAML tag"
        raise TaskFileError(f"{path}:{line}: {tag} (Python code) is not supported; give the field as a field "
                            "name or a Jinja template such as \"{{question}}\"") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise TaskFileError(f"{path}:{line}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from e
    if not isinstance(config, dict):
        raise TaskFileError(f"{path}:1: an lm-eval task config is a mapping of keys (task:, dataset_path:, ...)")
    lines = _key_lines(text)

    def at(key: str) -> str:
        return f"{path}:{lines.get(key, 1)}"

    for key, fix in _REFUSED.items():
        if key in config:
            raise _fail(at(key), f"`{key}` is not supported by afm's task loader", fix)
    notes = [f"ignored `{k}`" for k in sorted(config) if k not in _KNOWN | _IGNORED]
    if config.get("dataset_path") != "json":
        raise _fail(at("dataset_path"), f"dataset_path is {config.get('dataset_path')!r}",
                    "afm reads local files only: set `dataset_path: json` and `dataset_kwargs: {data_files: FILE}`")
    data_files = (config.get("dataset_kwargs") or {}).get("data_files")
    if not data_files:
        raise _fail(at("dataset_kwargs"), "no dataset_kwargs.data_files",
                    "add `dataset_kwargs: {data_files: {test: data.jsonl}}`")
    splits = data_files if isinstance(data_files, dict) else {"train": data_files}
    split = config.get("test_split") or config.get("validation_split")
    if split is None:
        if len(splits) != 1:
            raise _fail(at("dataset_kwargs"), f"several splits ({', '.join(splits)}) and no test_split",
                        "add `test_split: NAME`")
        split = next(iter(splits))
    if split not in splits:
        key = "test_split" if config.get("test_split") else "validation_split"
        raise _fail(at(key), f"split {split!r} is not in data_files ({', '.join(splits)})",
                    "name one of data_files' splits")
    files = splits[split] if isinstance(splits[split], list) else [splits[split]]
    if int(config.get("num_fewshot") or 0) != 0:
        raise _fail(at("num_fewshot"), f"num_fewshot {config['num_fewshot']} is not supported",
                    "use num_fewshot: 0 and write any examples into doc_to_text or description")
    output_type = config.get("output_type", "generate_until")
    if output_type not in ("multiple_choice", "generate_until"):
        raise _fail(at("output_type"), f"output_type {output_type!r} is not supported",
                    "use multiple_choice or generate_until (perplexity tasks: `ppl:DIR`)")
    for key in ("doc_to_text", "doc_to_target"):
        if key not in config:
            raise _fail(f"{path}:1", f"no `{key}`", f"add `{key}:` (a field name or a Jinja template)")
    if output_type == "multiple_choice" and "doc_to_choice" not in config:
        raise _fail(f"{path}:1", "a multiple_choice task needs `doc_to_choice`",
                    "add `doc_to_choice: choices` (a field holding the list) or a literal list")
    if "filter_list" in config:
        notes.append("ignored filter_list: generative answers are read after '####' or as the whole reply")
    if "metric_list" in config:
        notes.append("ignored metric_list: afm reports acc/acc_norm or verified accuracy")
    to_text = _Field("doc_to_text", config["doc_to_text"], at("doc_to_text"))
    to_target = _Field("doc_to_target", config["doc_to_target"], at("doc_to_target"))
    to_choice = _Field("doc_to_choice", config.get("doc_to_choice"), at("doc_to_choice"))
    description = _Field("description", config.get("description") or "", at("description"))
    delimiter = config.get("target_delimiter", " ")
    gen = config.get("generation_kwargs") or {}
    until = gen.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    questions: list[Any] = []
    for name in files:
        data_path = Path(name)
        if not data_path.is_absolute() and not data_path.exists():
            data_path = path.parent / name  # relative to the config (lm-eval resolves from the working directory)
        if not data_path.exists():
            raise _fail(at("dataset_kwargs"), f"data file {name!r} not found (looked in the working directory "
                        f"and {path.parent})", "fix the path in data_files")
        for where, doc in read_records(data_path):
            context = description.apply(doc, where) + _text(to_text.apply(doc, where), to_text, where)
            if output_type == "multiple_choice":
                choices = to_choice.apply(doc, where)
                if isinstance(choices, str):
                    try:
                        choices = ast.literal_eval(choices)
                    except (ValueError, SyntaxError) as e:
                        raise _fail(to_choice.where, f"doc_to_choice rendered {choices[:60]!r} for {where}, "
                                    "not a list", "render a Python list, e.g. \"{{choices.text}}\"") from e
                if isinstance(choices, dict):
                    choices = list(choices.values())
                choices = _check_choices(choices, f"{to_choice.where} (record {where})", "doc_to_choice")
                target = to_target.apply(doc, where)
                if to_target.renders(doc) and isinstance(target, str) and target.isdigit():
                    target = int(target)  # lm-eval reads a rendered number as the gold index
                gold = _gold_index(target, choices, f"{to_target.where} (record {where})", "doc_to_target")
                questions.append(MCQuestion(context, choices, gold, delimiter, where))
            else:
                target = to_target.apply(doc, where)
                answers = _answers(target, f"{to_target.where} (record {where})", "doc_to_target")
                questions.append(GenQuestion(answers, prompt=context, stop=until, where=where))
            if limit is not None and len(questions) >= limit:
                break
        if limit is not None and len(questions) >= limit:
            break
    if not questions:
        raise _fail(at("dataset_kwargs"), "the data files hold no records", "check data_files")
    kind: Literal["multiple_choice", "generative"] = (
        "multiple_choice" if output_type == "multiple_choice" else "generative")
    max_gen = gen.get("max_gen_toks")
    return TaskData(str(config.get("task") or path.stem), kind, questions, str(path),
                    int(max_gen) if max_gen else None, notes)


def _text(value: Any, f: _Field, where: str) -> str:
    if isinstance(value, str):
        return value
    raise _fail(f.where, f"{f.name} gave a {type(value).__name__} for {where}, not text",
                "point it at a text field or a template")


def load_humaneval(path: str | Path, limit: int | None = None) -> list[dict[str, str]]:
    """HumanEval-format problems: `prompt`, `test` (defining `check(candidate)`), `entry_point`, `task_id`."""
    problems = []
    for where, record in read_records(path):
        missing = [k for k in ("prompt", "test", "entry_point") if not isinstance(record.get(k), str)]
        if missing:
            raise _fail(where, f"missing or non-string {', '.join(missing)}",
                        "HumanEval records need prompt, test (with check(candidate)) and entry_point")
        problems.append({"task_id": str(record.get("task_id", where)), "prompt": record["prompt"],
                         "test": record["test"], "entry_point": record["entry_point"], "where": where})
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise TaskFileError(f"{path}: no problems; write one HumanEval record per line")
    return problems
