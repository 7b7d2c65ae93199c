"""Chat templates for a merge's ``chat_template`` key (mergekit's): a built-in template by name,
``auto`` (the template most input models have), or a Jinja template given in full.

The merged model's tokenizer gets the template in ``tokenizer_config.json`` (which transformers
read before 4.47) and in ``chat_template.jinja`` (which later versions read first), and in a
processor's ``chat_template.json`` where the tokenizer's folder has one, so that every version
applies the same template.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

# The built-in templates, by the names mergekit gives them. Each renders the conversation in the
# model family's own format, as the family's published template does; ``add_generation_prompt``
# opens the assistant's turn. chatml renders as mergekit 0.1.5's file does; the others differ
# from mergekit's files where those differ from the families' formats: mergekit's llama3 puts a
# newline after each <|eot_id|>, its mistral a space after <s> and before each [INST] and each
# answer, its exaone indentation (rendered as transformers renders templates), and its alpaca
# has no bos and eos tokens (this one opens with bos and ends each answer with eos, as
# Alpaca fine-tunes were trained) and puts the blank line before each turn instead of after
# it. A config that needs mergekit's exact text can give it in full.
BUILTIN = {
    # OpenAI's ChatML (Qwen, Hermes, many community fine-tunes).
    "chatml": (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    ),
    # Llama 3 and 3.x Instruct.
    "llama3": (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
        "{{- message['content'] | trim -}}{{- '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
        "{%- endif -%}"
    ),
    # Stanford Alpaca's instruction format.
    "alpaca": (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{{- message['content'] + '\\n\\n' -}}"
        "{%- elif message['role'] == 'user' -%}"
        "{{- '### Instruction:\\n' + message['content'] + '\\n\\n' -}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{- '### Response:\\n' + message['content'] + eos_token + '\\n\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"
    ),
    # Mistral Instruct's [INST] turns; a system message goes before the first user message.
    "mistral": (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] + '\\n\\n' -%}"
        "{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
        "{{- bos_token -}}"
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' -}}"
        "{%- elif message['role'] == 'assistant' -%}{{- message['content'] + eos_token -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    # LG's EXAONE 3.x: [|role|] turns; a conversation without a system turn gets an empty one.
    "exaone": (
        "{%- for message in messages -%}"
        "{%- if loop.first and message['role'] != 'system' -%}"
        "{{- '[|system|][|endofturn|]\\n' -}}"
        "{%- endif -%}"
        "{{- '[|' + message['role'] + '|]' + message['content'] -}}"
        "{%- if message['role'] == 'user' -%}{{- '\\n' -}}"
        "{%- else -%}{{- '[|endofturn|]\\n' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '[|assistant|]' -}}{%- endif -%}"
    ),
}

# The fewest characters a template given in full can have, as mergekit checks: shorter values
# (or ones without a Jinja tag) are taken for misspelt names, not templates.
_MIN_TEMPLATE = 20


def check(value: object, where: str = "chat_template") -> str:
    """The config's ``chat_template`` value, checked: ``auto``, a built-in name (``BUILTIN``)
    or a Jinja template (at least 20 characters with a ``{``); raises ValueError naming
    ``where`` otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a template name or a Jinja template, got {value!r}")
    if value == "auto" or value in BUILTIN:
        return value
    if len(value) < _MIN_TEMPLATE or "{" not in value:
        raise ValueError(
            f"{where}: {value!r} is not a built-in template ({', '.join(sorted(BUILTIN))}), "
            "'auto' (the template most of the merged models have), or a Jinja template"
        )
    problem = syntax_error(value)
    if problem is not None:
        raise ValueError(f"{where}: the Jinja template does not parse: {problem}")
    return value


def syntax_error(template: str) -> str | None:
    """Why ``template`` does not parse as transformers compiles chat templates (a sandboxed
    Jinja environment with trim_blocks, lstrip_blocks, the loop controls and the
    ``{% generation %}`` block), or None where it parses (or jinja2 is not installed)."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:  # pragma: no cover - jinja2 comes with torch
        return None

    class _Generation(jinja2.ext.Extension):
        # transformers' {% generation %}...{% endgeneration %} (marks the assistant's tokens)
        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_Generation, jinja2.ext.loopcontrols],
    )
    try:
        env.parse(template)
    except jinja2.TemplateSyntaxError as exc:
        return f"{exc.message} (line {exc.lineno})"
    return None


def read_template(folder: Path) -> str | None:
    """The chat template a tokenizer folder holds, as transformers loads it: its
    ``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template`` (a string, or
    the ``default`` entry of a list of named templates); None where it has none."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = (_read_json(folder / "tokenizer_config.json") or {}).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def resolve(value: str, folders: Iterable[Path]) -> tuple[str | None, str]:
    """The template text for the config's (checked) ``value``, and how it was chosen, for the
    model card. ``auto`` takes the template most of ``folders`` (the input models' tokenizer
    folders, base first) hold, compared without surrounding whitespace; on a tie, the first
    in that order (mergekit's choice among tied templates depends on a set's order). None
    where no folder has one."""
    if value in BUILTIN:
        return BUILTIN[value], f"the built-in {value} template"
    if value != "auto":
        return value, "the template the configuration gives"
    found = [t.strip() for t in (read_template(f) for f in folders) if t is not None]
    if not found:
        return None, "none of the merged models has one"
    counts = Counter(found)
    best = max(counts.values())
    template = next(t for t in found if counts[t] == best)
    return template, f"auto: the template {best} of {len(found)} merged models with one have"


def write(folder: Path, template: str) -> None:
    """Give the tokenizer in ``folder`` (a merge's output, not yet moved into place) the chat
    ``template``: ``chat_template.jinja``, and ``tokenizer_config.json``'s ``chat_template``
    (a list of named templates keeps the others, its ``default`` replaced, and they are also
    written to ``additional_chat_templates/NAME.jinja``, where transformers that read
    ``chat_template.jinja`` look for them; a tokenizer without that file gets one holding only
    the template, as transformers' ``save_pretrained`` always writes it), and a processor's
    ``chat_template.json`` where it exists."""
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    tokenizer_config = folder / "tokenizer_config.json"
    if not tokenizer_config.exists():
        _write_json(tokenizer_config, {"chat_template": template})
    elif (config := _read_json(tokenizer_config)) is not None:
        old = config.get("chat_template")
        if isinstance(old, list):
            _keep_named_templates(folder, old)
            config["chat_template"] = _set_in_list(old, template)
        else:
            config["chat_template"] = template
        _write_json(tokenizer_config, config)
    processor = folder / "chat_template.json"
    if processor.is_file() and (config := _read_json(processor)) is not None:
        config["chat_template"] = template
        _write_json(processor, config)


def _read_json(path: Path) -> dict | None:
    """A JSON object file's contents; None where it is not one (not meldkit's to repair:
    ``chat_template.jinja`` takes precedence anyway)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _write_json(path: Path, config: dict) -> None:
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _keep_named_templates(folder: Path, named: list) -> None:
    """Transformers that read ``chat_template.jinja`` (4.47 on) ignore the list of ``named``
    templates in ``tokenizer_config.json`` and read the others from
    ``additional_chat_templates/NAME.jinja``: write the list's named templates there (those
    the folder lacks), so that ``tool_use`` or ``rag`` templates survive the new default."""
    extra = folder / "additional_chat_templates"
    for entry in named:
        if not isinstance(entry, dict):
            continue
        name, text = entry.get("name"), entry.get("template")
        if name == "default" or not isinstance(name, str) or not isinstance(text, str):
            continue
        if "/" in name or name.startswith("."):
            continue  # not a file name
        path = extra / f"{name}.jinja"
        if not path.exists():
            extra.mkdir(exist_ok=True)
            path.write_text(text, encoding="utf-8")


def _set_in_list(named: list, template: str) -> list:
    """A list of named templates with its ``default`` entry set to ``template``."""
    rest = [t for t in named if not (isinstance(t, dict) and t.get("name") == "default")]
    return [{"name": "default", "template": template}, *rest]
