"""Shared-prefix rows: the candidates of an item share one row, their common prefix computed once.

Held to the layout worked out by hand, and to the scores each sentence gets alone (share_prefix
off, itself held to one-at-a-time references in test_scoring; and `official` directly here).
"""

import json

import numpy as np
import pytest
import torch

from vlmerge.evaluate.scoring import Scorer, common_prefix, pack_batch, tree_mask
from vlmerge.evaluate.tasks import Request

from test_scoring import official, setup  # noqa: F401  (setup: a fixture, the small multimodal model)


def test_pack_batch_lays_out_prefix_then_each_candidate():
    # two candidates sharing [1, 2]; a third sequence alone in its row
    seqs, scored = [[1, 2, 3, 4], [1, 2, 5], [7, 8]], [3, 2, 1]
    b = pack_batch(seqs, scored, [[0, 1], [2]], ["img", None, None], pad=0)
    assert b.ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0]]
    assert b.positions.tolist() == [[0, 1, 2, 3, 2], [0, 1, 0, 0, 0]]
    assert b.segments.tolist() == [[0, 0, 1, 1, 2], [1, 1, -1, -1, -1]]
    assert b.images == ["img", None]
    # seq 0 scores 2, 3, 4 from columns 0, 1, 2; seq 1 scores 2, 5 from columns 0 and 1 (the prefix's
    # last position predicts each candidate's first own token); seq 2 scores 8 from row 1, column 0
    assert b.keep.tolist() == [[True, True, True, False, False], [True, False, False, False, False]]
    assert list(zip(b.rows.tolist(), b.targets.tolist(), b.owners.tolist())) == [
        (0, 2, 0), (1, 3, 0), (2, 4, 0), (0, 2, 1), (1, 5, 1), (3, 8, 2)]
    assert b.requests.tolist() == [0, 1, 2]


def test_tree_mask_sees_the_prefix_and_its_own_segment():
    m = tree_mask(torch.tensor([[0, 0, 1, 1, 2, -1]]))[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0, 0],
                 [1, 1, 1, 0, 0, 0],
                 [1, 1, 1, 1, 0, 0],
                 [1, 1, 0, 0, 1, 0],  # candidate 2 does not see candidate 1
                 [1, 1, 0, 0, 0, 1]]  # padding: the prefix and itself, never an empty row


def test_common_prefix():
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix([[1, 2], [3]]) == 0
    assert common_prefix([[5, 6]]) == 2


def requests(features) -> list[Request]:
    a, b = (str(x) for x in features.index[:2])
    return [
        # a shared context, three candidates (EWoK, entity tracking, VQA)
        *(Request(t, context="The girl put the ball in the", group=0, image=a) for t in (" box", " red box", " bag")),
        # two images in one group (Winoground): two rows
        Request("a dog on a sofa", group=1, image=a), Request("a dog on a sofa", group=1, image=b),
        Request("a sofa on a dog", group=1, image=a),
        # one candidate the start of the other, and a group of one
        Request("The cat sat", group=2), Request("The cat sat on the mat", group=2),
        Request("Birds fly south in winter", group=3),
        # word surprisal (reading): subword by subword after the retokenised context
        Request("mat", context="The cat sat on the", group=4, by_subword=True),
        Request("the", context="The cat sat on", group=4, by_subword=True),
    ]


@pytest.mark.parametrize("prompt", ["takmaz2025", "legacy"])
def test_shared_rows_give_each_sentence_its_own_score(setup, prompt):
    model, tokenizer, features = setup
    reqs = requests(features)
    shared = Scorer(model, tokenizer, features=features, prompt=prompt, batch_size=4).score(reqs)
    alone = Scorer(model, tokenizer, features=features, prompt=prompt, batch_size=4, share_prefix=False).score(reqs)
    np.testing.assert_allclose(shared.logprob, alone.logprob, atol=1e-5, rtol=0)
    assert (shared.tokens == alone.tokens).all()
    assert len(set(np.round(shared.logprob, 4))) == len(reqs)  # every request scored on its own
    if prompt == "takmaz2025":  # and against the rule itself, one sentence at a time
        bos = tokenizer.bos_token_id
        for i in (0, 1, 6, 7):
            r = reqs[i]
            pixel = features.features[features.rows(np.array([r.image]))].float() if r.image else features.null[None]
            want = official(model, tokenizer, r.context + r.target, r.target, lead="<image> ", bos=bos,
                            special=False, pixel=pixel)
            assert shared.logprob[i] == pytest.approx(want, abs=1e-4)


def test_sharing_runs_fewer_tokens(setup, real_blimp):
    model, tokenizer, features = setup
    lines = (real_blimp / "anaphor_number_agreement.jsonl").read_text().splitlines()[:20]
    pairs = [json.loads(line) for line in lines]
    reqs = [Request(p[k], group=i) for i, p in enumerate(pairs) for k in ("sentence_good", "sentence_bad")]
    tokens = {}
    for share in (True, False):
        prepared = Scorer(model, tokenizer, features=features, share_prefix=share).prepare(reqs)
        tokens[share] = sum(int((b.segments >= 0).sum()) for b in prepared.batches)
    # the prompt (BOS, <image>, space) and the pair's first words are run once per pair
    assert tokens[True] <= tokens[False] - 3 * len(pairs)
