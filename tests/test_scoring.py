"""The batched scorer against a one-sentence-at-a-time fp32 reference, on real BLiMP."""

import json
from copy import deepcopy

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from vlmerge.config import ModelConfig, load_config
from vlmerge.data import FeatureTable
from vlmerge.evaluate.scoring import Scorer
from vlmerge.evaluate.tasks import Request
from vlmerge.model import build_config, init_model

from conftest import SMALL_WORLD

PARADIGMS = ["anaphor_number_agreement", "determiner_noun_agreement_2", "irregular_past_participle_verbs",
             "wh_questions_object_gap", "regular_plural_subject_verb_agreement_1", "npi_present_1"]


@pytest.fixture(scope="module")
def setup(small_prepared):
    cfg = load_config(None, [f"paths.root={small_prepared}", *SMALL_WORLD])
    tokenizer = AutoTokenizer.from_pretrained(cfg.layout.tokenizer_dir)
    features = FeatureTable(cfg.store_path)
    config = build_config(ModelConfig(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128,
                                      max_length=128), tokenizer, features.dim)
    return init_model(config, 3), tokenizer, features


def blimp_sentences(real_blimp, per_paradigm: int = 40) -> list[str]:
    out = []
    for uid in PARADIGMS:
        for line in (real_blimp / f"{uid}.jsonl").read_text().splitlines()[:per_paradigm]:
            row = json.loads(line)
            out += [row["sentence_good"], row["sentence_bad"]]
    return out


def reference(model, prefix_ids: list[int], tokens: list[int], pixel=None) -> float:
    """Sum of log p(token | everything before it), one sequence, fp32, straight from the logits."""
    ids = torch.tensor([prefix_ids + tokens])
    with torch.no_grad():
        kwargs = {"pixel_values": pixel} if pixel is not None else {}
        logp = model(input_ids=ids, **kwargs).logits.float().log_softmax(-1)[0]
    n = len(prefix_ids)
    return sum(logp[n - 1 + k, t].item() for k, t in enumerate(tokens))


def test_batched_scores_equal_one_at_a_time_on_real_blimp(setup, real_blimp):
    model, tokenizer, features = setup
    sentences = blimp_sentences(real_blimp)
    scorer = Scorer(model, tokenizer, features=features, batch_size=32)
    got = scorer.score([Request(s, group=i // 2) for i, s in enumerate(sentences)])
    prefix = [tokenizer.bos_token_id, model.config.image_token_index]
    for i, s in enumerate(sentences):
        tokens = tokenizer(s, add_special_tokens=False)["input_ids"]
        assert got.tokens[i] == len(tokens)
        assert got.logprob[i] == pytest.approx(reference(model, prefix, tokens, features.null[None]), abs=1e-4)


def test_context_is_conditioned_on_but_not_scored_and_images_matter(setup):
    model, tokenizer, features = setup
    scorer = Scorer(model, tokenizer, features=features)
    image = str(features.index[5])
    r = scorer.score([Request(" red", context="Question: what colour? Answer:", image=image),
                      Request(" red", context="Question: what colour? Answer:")])
    ctx = tokenizer("Question: what colour? Answer:", add_special_tokens=False)["input_ids"]
    tgt = tokenizer(" red", add_special_tokens=False)["input_ids"]
    prefix = [tokenizer.bos_token_id, model.config.image_token_index]
    full = reference(model, prefix, ctx + tgt, features.features[5:6].float())
    only_ctx = reference(model, prefix, ctx, features.features[5:6].float())
    assert r.logprob[0] == pytest.approx(full - only_ctx, abs=1e-4)
    assert r.logprob[0] != pytest.approx(r.logprob[1], abs=1e-6)


def test_bf16_decisions_mostly_agree_with_fp32(setup, real_blimp):
    model, tokenizer, features = setup
    sentences = blimp_sentences(real_blimp)
    reqs = [Request(s, group=i // 2) for i, s in enumerate(sentences)]
    fp32 = Scorer(model, tokenizer, features=features).score(reqs).logprob
    copy = deepcopy(model)  # a bf16 scorer casts the model's weights in place
    bf16 = Scorer(copy, tokenizer, features=features, dtype="bf16").score(reqs).logprob
    assert all(p.dtype == torch.bfloat16 for p in copy.parameters())
    agree = ((fp32[0::2] > fp32[1::2]) == (bf16[0::2] > bf16[1::2])).mean()
    assert agree >= 0.9 and abs(bf16 - fp32).max() < 1.0


def test_plain_causal_lm_gets_bos_only(setup, real_blimp, tmp_path):
    _, tokenizer, _ = setup
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)).eval()
    sentences = blimp_sentences(real_blimp, 5)
    got = Scorer(lm, tokenizer).score([Request(s) for s in sentences])
    for i, s in enumerate(sentences):
        tokens = tokenizer(s, add_special_tokens=False)["input_ids"]
        assert got.logprob[i] == pytest.approx(reference(lm, [tokenizer.bos_token_id], tokens), abs=1e-4)
