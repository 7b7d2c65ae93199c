"""mergekit's ``chat_template`` key: built-in templates by name, ``auto``, a Jinja template given
in full; written where every transformers version reads it, checked before the merge."""

from __future__ import annotations

import json

import jinja2
import pytest
import yaml

from meldkit.merging import ConfigError, MergeError, merge, parse_config
from meldkit.merging import chat_templates as ct
from meldkit.merging.synthetic import write_checkpoint
from tests.merging.test_engine import config_for, finetune, llama_state, write_model

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
]


def render(template: str, messages=MESSAGES, add_generation_prompt=True) -> str:
    # as transformers renders chat templates
    env = jinja2.Environment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    return env.from_string(template).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token="<s>",
        eos_token="</s>",
    )


def test_the_builtin_templates_render_their_formats():
    assert render(ct.BUILTIN["chatml"]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render(ct.BUILTIN["llama3"], add_generation_prompt=False) == (
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
    )
    assert render(ct.BUILTIN["alpaca"]) == (
        "<s>Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello</s>\n\n"
        "### Instruction:\nBye\n\n### Response:\n"
    )
    # Mistral: the system message goes into the first [INST] turn only.
    assert render(ct.BUILTIN["mistral"]) == (
        "<s>[INST] Be brief.\n\nHi [/INST]Hello</s>[INST] Bye [/INST]"
    )
    assert (
        render(ct.BUILTIN["mistral"], MESSAGES[1:])
        == "<s>[INST] Hi [/INST]Hello</s>[INST] Bye [/INST]"
    )
    assert render(ct.BUILTIN["exaone"], MESSAGES[1:2]) == (
        "[|system|][|endofturn|]\n[|user|]Hi\n[|assistant|]"
    )
    assert render(ct.BUILTIN["exaone"], MESSAGES[:3], False) == (
        "[|system|]Be brief.[|endofturn|]\n[|user|]Hi\n[|assistant|]Hello[|endofturn|]\n"
    )


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("chatm", "'chatm' is not a built-in template"),
        ("{{ x }}", "is not a built-in template"),  # too short for a template: a typo
        ("a long value without any jinja tags", "not a built-in template"),
        (3, "expected a template name or a Jinja template, got 3"),
        (
            "{% for m in messages %}{{ m['content'] }}{% endfo %}",
            r"does not parse: Encountered unknown tag 'endfo'.* \(line 1\)",
        ),
    ],
)
def test_a_bad_chat_template_is_refused_by_name(value, match):
    cfg = {"merge_method": "linear", "models": [], "chat_template": value}
    with pytest.raises(ConfigError, match=rf"chat_template: .*{match}"):
        parse_config(cfg)


@pytest.fixture
def models(tmp_path):
    base = llama_state(0)
    paths = {"base": write_model(tmp_path / "base", base)}
    for i in range(3):
        paths[f"ft{i}"] = write_model(tmp_path / f"ft{i}", finetune(base, i + 1))
    for p in paths.values():
        (p / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))
    return tmp_path, paths


def test_a_builtin_template_is_written_for_every_transformers_version(models):
    tmp, paths = models
    # The base's tokenizer has a list of named templates and a processor's template file.
    named = [{"name": "default", "template": "{{ old }}"}, {"name": "tools", "template": "{{ t }}"}]
    (paths["base"] / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    (paths["base"] / "chat_template.json").write_text(json.dumps({"chat_template": "{{ old }}"}))
    cfg = {**config_for("ties", paths), "chat_template": "chatml"}
    out = merge(cfg, tmp / "out", progress=False)
    want = ct.BUILTIN["chatml"]
    assert (out / "chat_template.jinja").read_text() == want
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == [
        {"name": "default", "template": want},
        {"name": "tools", "template": "{{ t }}"},
    ]
    assert json.loads((out / "chat_template.json").read_text())["chat_template"] == want
    # where transformers that read chat_template.jinja look for the other named templates
    assert (out / "additional_chat_templates" / "tools.jinja").read_text() == "{{ t }}"
    assert ct.read_template(out) == want
    assert "chat template: the built-in chatml template" in (out / "README.md").read_text()
    # the inputs are untouched
    assert (
        json.loads((paths["base"] / "tokenizer_config.json").read_text())["chat_template"] == named
    )


def test_auto_takes_the_template_most_models_have(models):
    tmp, paths = models
    a = "{% for m in messages %}A{{ m['content'] }}{% endfor %}"
    b = "{% for m in messages %}B{{ m['content'] }}{% endfor %}"
    # base: a (in tokenizer_config.json); ft0: b (chat_template.jinja, read first); ft1: b with
    # whitespace around; ft2: none. b wins 2 to 1.
    (paths["base"] / "tokenizer_config.json").write_text(json.dumps({"chat_template": a}))
    (paths["ft0"] / "tokenizer_config.json").write_text(json.dumps({"chat_template": a}))
    (paths["ft0"] / "chat_template.jinja").write_text(b)
    (paths["ft1"] / "chat_template.jinja").write_text("\n" + b + "\n")
    cfg = {**config_for("ties", paths), "chat_template": "auto"}
    out = merge(cfg, tmp / "out", progress=False)
    assert ct.read_template(out) == b
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == b
    assert (
        "auto: the template 2 of 3 merged models with one have" in (out / "README.md").read_text()
    )
    # a tie goes to the first in the config's order (base, then the models)
    (paths["ft1"] / "chat_template.jinja").unlink()
    out = merge(cfg, tmp / "out_tie", progress=False)
    assert ct.read_template(out) == a
    # none anywhere: a warning, and the tokenizer keeps what it had (nothing)
    for p in paths.values():
        (p / "tokenizer_config.json").write_text("{}")
        (p / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.warns(UserWarning, match="chat_template auto: none of the merged models has one"):
        out = merge(cfg, tmp / "out_none", progress=False)
    assert ct.read_template(out) is None


def test_transformers_generation_blocks_parse():
    # transformers' {% generation %} marks the assistant's tokens (return_assistant_tokens_mask)
    t = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    assert ct.check(t) == t


def test_a_tokenizer_without_tokenizer_config_gets_one(models):
    # Older transformers read the template from tokenizer_config.json only.
    tmp, paths = models
    (paths["base"] / "tokenizer_config.json").unlink()
    (paths["base"] / "tokenizer.json").write_text("{}")
    out = merge(
        {**config_for("ties", paths), "chat_template": "chatml"}, tmp / "out", progress=False
    )
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config == {"chat_template": ct.BUILTIN["chatml"]}


def test_a_template_given_in_full_from_a_yaml_file(models):
    tmp, paths = models
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    yml = tmp / "merge.yml"
    yml.write_text(yaml.safe_dump({**config_for("ties", paths), "chat_template": template}))
    out = merge(yml, tmp / "out", progress=False)
    assert ct.read_template(out) == template
    assert render(template, MESSAGES[1:3]) == "<user>Hi<assistant>Hello"


def test_a_chat_template_without_a_tokenizer_is_refused_before_merging(models):
    tmp, paths = models
    bare = write_checkpoint(tmp / "bare", llama_state(0), config={"model_type": "llama"})
    (bare / "tokenizer_config.json").unlink()
    cfg = {**config_for("ties", paths), "chat_template": "chatml", "base_model": str(bare)}
    with pytest.raises(MergeError, match=r"chat_template: the output has no tokenizer"):
        merge(cfg, tmp / "out", progress=False)
    assert not (tmp / "out").exists()


def test_transformers_applies_the_merged_template(models):
    """A real tokenizer (a word-level one built here) saved with the base: the merged model's
    tokenizer loads in transformers and applies the configured template."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    tmp, paths = models
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "Hi": 3}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = {
        "default": "{% for m in messages %}OLD{{ m['content'] }}{% endfor %}",
        "tool_use": "{% for m in messages %}TOOL{{ m['content'] }}{% endfor %}",
    }
    fast.save_pretrained(paths["base"])
    out = merge(
        {**config_for("ties", paths), "chat_template": "llama3"}, tmp / "out", progress=False
    )
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    text = tok.apply_chat_template(MESSAGES[1:2], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # the base tokenizer's other named template survives
    tool = tok.apply_chat_template(MESSAGES[1:2], tokenize=False, chat_template="tool_use")
    assert tool == "TOOLHi"
