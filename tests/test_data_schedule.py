import numpy as np
import pytest

from vlmerge.data import Piece, count_batches, epoch_order, piece_tokens, plan_batches
from vlmerge.launch import rendezvous_env
from vlmerge.errors import VlmergeError
from vlmerge.train.schedule import babylm_words, batch_shape, checkpoint_words, lr_factor, rank_micro_batches


def test_babylm_schedule():
    w = babylm_words()
    assert w[:3] == [1_000_000, 2_000_000, 3_000_000] and 10_000_000 in w and 20_000_000 in w
    assert w[-1] == 1_000_000_000 and len(w) == 10 + 9 + 9
    assert checkpoint_words([30, 10, 10, 0]) == [10, 30]


def test_batches_end_exactly_on_the_scheduled_words():
    words = np.array([3, 5, 2, 4, 6])
    order = np.arange(5)
    batches = list(plan_batches(order, words, batch_size=2, thresholds=[4, 10, 12], words_seen=0))
    assert [b.words_seen for b in batches] == [4, 10, 12, 20]
    # 4 falls inside sample 1: the batch ends with its first word, the next starts with the rest;
    # 12 falls inside sample 3: that batch holds just its first two words.
    assert [b.pieces for b in batches] == [
        [Piece(0, 0, 3), Piece(1, 0, 1)],
        [Piece(1, 1, 5), Piece(2, 0, 2)],
        [Piece(3, 0, 2)],
        [Piece(3, 2, 4), Piece(4, 0, 6)],
    ]
    assert sum(b.words for b in batches) == words.sum()
    pieces = [p for b in batches for p in b.pieces]
    for s in range(5):  # every word of every sample exactly once, in order
        spans = [(p.start, p.stop) for p in pieces if p.sample == s]
        assert spans[0][0] == 0 and spans[-1][1] == words[s]
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("seed", range(20))
def test_count_batches_and_resume_agree_with_the_plan(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    words = rng.integers(1, 12, n)
    order = epoch_order(n, seed, 1)
    start = int(rng.integers(0, 50))
    thresholds = sorted(set(rng.integers(1, words.sum() + 80, 6).tolist()))
    batch = int(rng.integers(1, 7))
    plan = list(plan_batches(order, words, batch, thresholds, start))
    assert count_batches(order, words, batch, thresholds, start) == len(plan)
    assert {t for t in thresholds if start < t <= start + words.sum()} <= {b.words_seen for b in plan}
    # Resuming after any batch gives the same remaining batches.
    k = int(rng.integers(0, len(plan)))
    b = plan[k]
    assert list(plan_batches(order, words, batch, thresholds, b.words_seen, b.cursor, b.offset)) == plan[k + 1 :]


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert np.array_equal(epoch_order(50, 1, 2), epoch_order(50, 1, 2))
    assert not np.array_equal(epoch_order(50, 1, 2), epoch_order(50, 1, 3))
    assert sorted(epoch_order(50, 1, 2)) == list(range(50))


def test_piece_tokens_split_at_word_starts():
    tokens = np.array([1, 2, 3, 4, 2])  # words: [1 2] [3] [4 2]
    starts = np.array([True, False, True, True, False])
    assert piece_tokens(tokens, Piece(0, 0, 3), 3, starts).tolist() == [1, 2, 3, 4, 2]
    assert piece_tokens(tokens, Piece(0, 0, 1), 3, starts).tolist() == [1, 2]
    assert piece_tokens(tokens, Piece(0, 1, 3), 3, starts).tolist() == [3, 4, 2]


def test_a_global_batch_keeps_its_size_on_any_number_of_ranks():
    assert batch_shape(32, 1, 512, world=2) == (512, 8)  # the paper: 2 GPUs × 32 × accumulation 8
    assert batch_shape(32, 1, 512, world=1) == (512, 16)
    assert batch_shape(32, 3, None, world=2) == (192, 3)  # without it the batch grows with the ranks
    with pytest.raises(VlmergeError, match="global_batch 512 is not a multiple of micro_batch_size 32 × 3 rank"):
        batch_shape(32, 1, 512, world=3)


@pytest.mark.parametrize("world, accum", [(1, 4), (2, 2), (4, 1)])
def test_micro_batches_are_the_same_slots_whoever_runs_them(world, accum):
    pieces = list(range(14))  # a short batch: 14 of 4 × 4 = 16 pieces, the last slot partly empty
    mine = [rank_micro_batches(pieces, 4, rank, world, accum) for rank in range(world)]
    slots = {rank + world * i: chunk for rank in range(world) for i, chunk in enumerate(mine[rank])}
    assert [slots[j] for j in range(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13]]
    assert all(len(m) == accum for m in mine)  # every rank runs its accumulation steps, empty or not
    assert rank_micro_batches(pieces[:3], 4, 1, 2, 1) == [[]]  # nothing left for rank 1: a stand-in step


def test_lr_warms_up_then_decays_to_the_floor():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_ranks_come_from_slurm_under_srun():
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
           "MASTER_ADDR": "node07"}
    assert rendezvous_env(env) == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                                   "MASTER_ADDR": "node07", "MASTER_PORT": str(29500 + 1234)}
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "5",
                "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}
    assert rendezvous_env(torchrun)["RANK"] == "0"  # torchrun's own variables win
    alone = rendezvous_env({})
    assert alone["RANK"] == "0" and alone["WORLD_SIZE"] == "1" and int(alone["MASTER_PORT"]) > 0


def test_a_line_longer_than_max_length_trains_whole_as_several_sequences(small_prepared, tmp_path):
    """Every word counted as seen is trained on: a long line is split between words, not cut."""
    from conftest import SMALL_WORLD
    from vlmerge.config import load_config
    from vlmerge.data import Piece, run_data, split_note
    from vlmerge.precompute import corpus
    from vlmerge.problems import ProblemLog

    root = tmp_path / "root"
    for rel in ("demo", "features", "runs/demo/tokenizer"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(small_prepared / rel)
    lines = [l for l in (small_prepared / "demo/text/train.txt").read_text().splitlines() if l.strip()][:20]
    long_line = " ".join(lines)  # some 170 words, 290 tokens: the others fit in 48
    text = tmp_path / "text.train"
    text.write_text("\n".join([*lines[:5], long_line, *lines[5:10]]) + "\n")
    cfg = load_config(None, [f"paths.root={root}", *SMALL_WORLD, f"data.text=['{text}']", "model.max_length=48"])
    corpus.run(cfg)
    data = run_data(cfg, ["text"], ProblemLog())
    samples, collate = data.samples, data.collate

    index = corpus.TokenShards(cfg.layout.corpus_source_dir("text")).index
    assert samples.words.sum() == index["words"] == sum(len(l.split()) for l in [*lines[:10], long_line])
    seqs = [collate.sequence(Piece(i, 0, int(samples.words[i]))) for i in range(len(samples))]
    assert max(len(s) for s in seqs) <= 48
    # Every token of every line is trained on once, with one EOS per line.
    assert collate.tokens_in([Piece(i, 0, int(samples.words[i])) for i in range(len(samples))]) == \
        index["tokens"] + 11
    parts = [seqs[i][collate.prefix:] for i in np.flatnonzero(samples.local == 5)]  # the long line's
    ids = data.tokenizer.backend_tokenizer.encode(long_line, add_special_tokens=False).ids
    assert sum(parts, []) == ids + [collate.eos] and all(collate.eos not in p for p in parts[:-1])
    assert samples.split_lines == 1 and len(parts) == samples.parts > 5
    assert "1 of 11 corpus lines do not fit model.max_length 48" in split_note(samples, 48)
