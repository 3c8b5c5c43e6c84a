"""DevBench (devbench_vv, devbench_trog, devbench_things) on fixture files in the official layout:
the metrics against one-item-at-a-time implementations of the official comparison code written
here, the small maths against hand-computed values, and one run through the real Scorer."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from scipy.optimize import minimize_scalar
from scipy.stats import rankdata

from vlmerge.errors import VlmergeError
from vlmerge.evaluate.tasks import Request, Scores, get_task
from vlmerge.evaluate.tasks.devbench import (PROBES_PER_GROUP, cosine_matrix, fit_beta,
                                             kl_divergence, mean_kl, rsa, softmax_rows, trial_correct)
from vlmerge.problems import ProblemLog

VV = "assets/lex-viz_vocab/images"
TROG = "assets/gram-trog/images"
THINGS = "assets/sem-things/object_images_CC0"
VV_MANIFEST = [("acorn", "coconut", "key", "clothesline"), ("aloe", "cactus", "bracket", "banner"),
               ("antenna", "stem", "pinecone", "backgammon"), ("artichoke", "leek", "sunroof", "cello")]
TROG_MANIFEST = [("the cat is big", ("5-a", "5-b", "5-c", "5-d")), ("the dog runs", ("6-a", "6-b", "6-c", "6-d")),
                 ("a girl sits", ("7-a", "7-b", "7-c", "7-d"))]
CONCEPTS = ["aardvark", "abacus", "accordion", "acorn", "airplane"]


def write(path: Path, text: str, encoding: str = "utf-8") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)


def human_things() -> np.ndarray:
    x = np.random.default_rng(5).normal(size=(len(CONCEPTS), 3))
    return x @ x.T


@pytest.fixture
def devbench(tmp_path) -> Path:
    """A DevBench folder as BabyLM's download_data.sh lays it out, the official CSV columns, a few trials."""
    root = tmp_path / "devbench"
    write(root / "assets/lex-viz_vocab/manifest.csv", "image1,image2,image3,image4,text1\n" + "".join(
        ",".join(f"images/{w}.jpg" for w in row) + f",{row[0]}\n" for row in VV_MANIFEST))
    # age 4 lacks trial 3; trial 9 has no manifest row (ignored); an empty cell is 0 (fillna(0))
    write(root / "evals/lex-viz_vocab/human.csv", "text1,age_bin,trial,image1,image2,image3,image4\n"
          "acorn,4,1,0.85,0.05,0.07,0.03\nacorn,25,1,1,0,0,0\naloe,4,2,0.4,0.3,0.2,0.1\n"
          "aloe,25,2,0.7,0.1,,0.2\nantenna,25,3,0.5,0.25,0.125,0.125\nartichoke,4,4,0.6,0.2,0.1,0.1\n"
          "artichoke,25,4,0.9,0.05,0.05,0\nzebra,4,9,0.25,0.25,0.25,0.25\n")
    write(root / "assets/gram-trog/manifest.csv", "image1,image2,image3,image4,text1\n" + "".join(
        ",".join(f"images/{i}.png" for i in imgs) + f",{text}\n" for text, imgs in TROG_MANIFEST))
    # trial 4 has no manifest row: matched by number, as the official
    write(root / "evals/gram-trog/human.csv", "trial,text1,image1,image2,image3,image4\n"
          "1,the cat is big,0.9,0.05,0.03,0.02\n2,the dog runs,0.6,0.2,0.1,0.1\n3,a girl sits,0.3,0.3,0.2,0.2\n"
          "4,extra,0.25,0.25,0.25,0.25\n")
    # sem-things' manifest starts with a byte-order mark, as the official one
    write(root / "assets/sem-things/manifest.csv", "text1,image1\n" + "".join(
        f"{c},object_images_CC0/{c}.jpg\n" for c in CONCEPTS), encoding="utf-8-sig")
    (root / "evals/sem-things").mkdir(parents=True)
    scipy.io.savemat(root / "evals/sem-things/spose_similarity.mat", {"spose_sim": human_things()})
    return root


def chosen_scores(reqs: list[Request], seed: int) -> tuple[Scores, dict, dict]:
    """Scores for the requests from tables the test keeps: logprob per (text, image), tokens per text."""
    rng = np.random.default_rng(seed)
    texts = sorted({r.target for r in reqs})
    tokens = {t: 1 + k % 3 for k, t in enumerate(texts)}
    logprob = {(r.target, r.image): float(-rng.uniform(1, 12)) for r in reqs}
    return (Scores(np.array([logprob[r.target, r.image] for r in reqs]), np.array([tokens[r.target] for r in reqs])),
            logprob, tokens)


def by_key(metrics) -> dict[tuple[str, str], tuple[float, int]]:
    return {(m.subtask, m.metric): (m.value, m.n) for m in metrics}


# --- the official comparison code, one trial at a time --------------------------------------------


def official_sims(manifest: list[tuple[str, tuple[str, ...]]], logprob: dict, tokens: dict) -> list[list[float]]:
    """One row per manifest trial: each image's −loss, here the text's log-probability per token."""
    return [[logprob[text, img] / tokens[text] for img in imgs] for text, imgs in manifest]


def official_correct(sims: list[list[float]]) -> list[bool]:
    return [row[0] > row[1] and row[0] > row[2] and row[0] > row[3] for row in sims]


def official_kl(p: list[float], q: list[float]) -> float:
    total = 0.0
    for a, b in zip(p, q):
        a, b = min(max(a, 1e-10), 1.0), min(max(b, 1e-10), 1.0)
        total += a * math.log(a / b)
    return total


def official_mean_kl(human: dict[int, list[float]], sims: list[list[float]], beta: float) -> float:
    """softmax_images (minus the global max of all trials' images), then get_mean_kl_img: the trials in both."""
    top = max(v for row in sims for v in row)
    kls = []
    for trial in sorted(human):
        if not 1 <= trial <= len(sims):
            continue  # a group of one row
        e = [math.exp(beta * (v - top)) for v in sims[trial - 1]]
        kls.append(official_kl(human[trial], [x / sum(e) for x in e]))
    return sum(kls) / len(kls)


def official_opt(human: dict[int, list[float]], sims: list[list[float]]) -> float:
    """The least mean KL over β in [0.025, 40], found here by a dense grid and a bounded refinement."""
    grid = np.geomspace(0.025, 40, 2000)
    values = [official_mean_kl(human, sims, b) for b in grid]
    k = int(np.argmin(values))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    res = minimize_scalar(lambda b: official_mean_kl(human, sims, b), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-9})
    return min(values[k], float(res.fun))


def human_table(rows: list[tuple], age: str | None = None) -> dict[int, list[float]]:
    return {r[0]: list(r[2:]) for r in rows if age is None or r[1] == age}


def check_kl(metrics: dict, sub: str, human: dict[int, list[float]], sims: list[list[float]], n: int) -> None:
    """Our KL equals the official objective at our β, and the official optimum to NLopt's ftol_abs (1e-4)."""
    kl, got_n = metrics[sub, "kl"]
    beta, _ = metrics[sub, "beta"]
    assert got_n == n and 0.025 <= beta <= 40
    assert kl == pytest.approx(official_mean_kl(human, sims, beta), abs=1e-12)
    best = official_opt(human, sims)
    assert best - 1e-7 <= kl <= best + 1e-4


# --- the tasks -----------------------------------------------------------------------------------


VV_HUMAN = [(1, "4", .85, .05, .07, .03), (1, "25", 1, 0, 0, 0), (2, "4", .4, .3, .2, .1), (2, "25", .7, .1, 0, .2),
            (3, "25", .5, .25, .125, .125), (4, "4", .6, .2, .1, .1), (4, "25", .9, .05, .05, 0),
            (9, "4", .25, .25, .25, .25)]
TROG_HUMAN = [(1, "", .9, .05, .03, .02), (2, "", .6, .2, .1, .1), (3, "", .3, .3, .2, .2), (4, "", .25, .25, .25, .25)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_viz_vocab_accuracy_and_kl_per_age_bin_equal_the_official_rule(devbench, seed):
    task, problems = get_task("devbench_vv"), ProblemLog()
    items = task.load(devbench, problems)
    reqs = task.requests(items)
    assert not problems.items and len(reqs) == 16
    scores, logprob, tokens = chosen_scores(reqs, seed)
    manifest = [(row[0], tuple(f"{VV}/{w}.jpg" for w in row)) for row in VV_MANIFEST]
    logprob[manifest[1][0], manifest[1][1][1]] = logprob[manifest[1][0], manifest[1][1][0]]  # a tie: wrong
    scores = Scores(np.array([logprob[r.target, r.image] for r in reqs]), scores.tokens)
    sims = official_sims(manifest, logprob, tokens)
    metrics, per_item = task.evaluate(items, scores)
    m = by_key(metrics)
    correct = official_correct(sims)
    assert not correct[1]
    assert m["", "accuracy"] == (pytest.approx(sum(correct) / 4), 4)
    assert [(i.item_id, i.value) for i in per_item] == [(str(t), float(c)) for t, c in zip(range(1, 5), correct)]
    check_kl(m, "age_bin:4", human_table(VV_HUMAN, "4"), sims, 3)  # trials 1, 2, 4 (9 has no manifest row)
    check_kl(m, "age_bin:25", human_table(VV_HUMAN, "25"), sims, 4)
    assert [x.subtask for x in metrics] == ["", "age_bin:4", "age_bin:4", "age_bin:25", "age_bin:25"]


@pytest.mark.parametrize("seed", [0, 3])
def test_trog_accuracy_and_kl_equal_the_official_rule(devbench, seed):
    task = get_task("devbench_trog")
    items = task.load(devbench, ProblemLog())
    reqs = task.requests(items)
    scores, logprob, tokens = chosen_scores(reqs, seed)
    manifest = [(text, tuple(f"{TROG}/{i}.png" for i in imgs)) for text, imgs in TROG_MANIFEST]
    sims = official_sims(manifest, logprob, tokens)
    m = by_key(task.evaluate(items, scores)[0])
    assert m["", "accuracy"] == (pytest.approx(np.mean(official_correct(sims))), 3)
    check_kl(m, "", human_table(TROG_HUMAN), sims, 3)


def official_rsa(human: np.ndarray, embeds: list[list[float]]) -> float:
    """cosine_similarity of the embeddings, then Spearman ρ of the lower triangles (ranks, then Pearson)."""
    n = len(embeds)
    norms = [math.sqrt(sum(v * v for v in e)) for e in embeds]
    sim = [[sum(a * b for a, b in zip(embeds[i], embeds[j])) / (norms[i] * norms[j]) for j in range(n)]
           for i in range(n)]
    x = [human[i][j] for i in range(n) for j in range(i)]
    y = [sim[i][j] for i in range(n) for j in range(i)]
    rx, ry = rankdata(x), rankdata(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


@pytest.mark.parametrize("seed", [0, 1])
def test_things_rsa_of_probe_profiles_equals_the_official_rule_on_them(devbench, seed):
    task = get_task("devbench_things")
    items = task.load(devbench, ProblemLog())
    reqs = task.requests(items)
    assert len(reqs) == len(CONCEPTS) ** 2 and reqs[1] == Request("abacus", image=f"{THINGS}/aardvark.jpg")
    scores, logprob, tokens = chosen_scores(reqs, seed)
    images = [f"{THINGS}/{c}.jpg" for c in CONCEPTS]
    raw = [[logprob[c, img] / tokens[c] for c in CONCEPTS] for img in images]
    means = [sum(raw[i][j] for i in range(len(images))) / len(images) for j in range(len(CONCEPTS))]
    centred = [[raw[i][j] - means[j] for j in range(len(CONCEPTS))] for i in range(len(images))]
    metrics, per_item = task.evaluate(items, scores)
    m = by_key(metrics)
    assert m["", "rsa"] == (pytest.approx(official_rsa(human_things(), centred), abs=1e-12), 5)
    assert m["", "rsa_uncentred"] == (pytest.approx(official_rsa(human_things(), raw), abs=1e-12), 5)
    assert per_item == []


def test_things_without_an_image_drops_its_row_column_and_probe(devbench):
    task = get_task("devbench_things")
    items = [it for it in task.load(devbench, ProblemLog()) if it.concept != "abacus"]
    reqs = task.requests(items)
    assert len(reqs) == 16 and all(r.target != "abacus" for r in reqs)
    scores, logprob, tokens = chosen_scores(reqs, 4)
    kept = [0, 2, 3, 4]
    raw = [[logprob[CONCEPTS[j], f"{THINGS}/{CONCEPTS[i]}.jpg"] / tokens[CONCEPTS[j]] for j in kept] for i in kept]
    human = human_things()[np.ix_(kept, kept)]
    assert by_key(task.evaluate(items, scores)[0])["", "rsa_uncentred"][0] == pytest.approx(official_rsa(human, raw))


def test_things_groups_hold_one_image_and_at_most_64_probes(devbench):
    items = get_task("devbench_things").load(devbench, ProblemLog())
    many = [type(items[0])(k, f"w{k}", f"img{k // 100}", items[0].human) for k in range(150)]  # 150 probes, 2 images
    reqs = get_task("devbench_things").requests(many)
    groups: dict[int, list[Request]] = {}
    for r in reqs:
        groups.setdefault(r.group, []).append(r)
    assert len(reqs) == 150 * 150 and len(groups) == 150 * 3
    assert all(len({r.image for r in g}) == 1 and len(g) <= PROBES_PER_GROUP for g in groups.values())


# --- files ---------------------------------------------------------------------------------------


def test_image_ids_are_paths_under_the_devbench_folder(devbench):
    vv = get_task("devbench_vv").load(devbench, ProblemLog())
    trog = get_task("devbench_trog").load(devbench, ProblemLog())
    assert vv[0].images == tuple(f"{VV}/{w}.jpg" for w in VV_MANIFEST[0]) and vv[0].text == "acorn"
    assert trog[2].images[0] == f"{TROG}/7-a.png" and trog[2].trial == 3
    assert vv[1].human["25"].tolist() == [0.7, 0.1, 0.0, 0.2]  # the empty cell
    assert set(vv[2].human) == {"25"}
    things = get_task("devbench_things").load(devbench, ProblemLog())
    assert [(t.index, t.concept, t.image) for t in things[:2]] == [(0, "aardvark", f"{THINGS}/aardvark.jpg"),
                                                                   (1, "abacus", f"{THINGS}/abacus.jpg")]


def test_a_malformed_row_is_a_problem_and_keeps_the_trial_numbers(devbench):
    path = devbench / "assets/gram-trog/manifest.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "images/x.png,,images/y.png,images/z.png,broken", *lines[1:]]) + "\n")
    human = devbench / "evals/gram-trog/human.csv"
    human.write_text(human.read_text() + "five,x,1,0,0,0\n")
    problems = ProblemLog()
    items = get_task("devbench_trog").load(devbench, problems)
    assert [it.trial for it in items] == [2, 3, 4]  # the malformed row was trial 1
    assert [w.rsplit("/", 1)[1] for w, _ in problems.items] == ["manifest.csv:2", "human.csv:6"]
    assert all(what.startswith("malformed line") for _, what in problems.items)
    assert items[0].human[""].tolist() == [0.6, 0.2, 0.1, 0.1]  # human trial 2, by number


def test_missing_files_are_one_line_errors_naming_them(devbench):
    (devbench / "evals/lex-viz_vocab/human.csv").unlink()
    with pytest.raises(VlmergeError, match="lex-viz_vocab/human.csv: DevBench human data not found"):
        get_task("devbench_vv").load(devbench, ProblemLog())
    with pytest.raises(VlmergeError, match="nowhere/assets/gram-trog/manifest.csv: DevBench manifest not found"):
        get_task("devbench_trog").load(devbench.parent / "nowhere", ProblemLog())
    scipy.io.savemat(devbench / "evals/sem-things/spose_similarity.mat", {"spose_sim": np.eye(4)})
    with pytest.raises(VlmergeError, match=r"spose_sim is \(4, 4\), the manifest has 5 rows"):
        get_task("devbench_things").load(devbench, ProblemLog())


def test_a_devbench_image_source_lists_every_image_once_for_precompute(devbench, tmp_path):
    from vlmerge.config import ImageSource
    from vlmerge.precompute.manifests import read_image_source

    items = read_image_source(ImageSource(manifest=str(devbench), format="devbench"), ProblemLog())
    assert len(items) == 16 + 12 + 5
    assert items[0].image_id == f"{VV}/acorn.jpg" and items[0].path == devbench / VV / "acorn.jpg"
    assert all(it.path == devbench / it.image_id for it in items)
    every = {img for name in ("devbench_vv", "devbench_trog", "devbench_things")
             for r in get_task(name).requests(get_task(name).load(devbench, ProblemLog())) for img in [r.image]}
    assert {it.image_id for it in items} == every
    with pytest.raises(VlmergeError, match="no DevBench manifests"):
        read_image_source(ImageSource(manifest=str(tmp_path / "empty"), format="devbench"), ProblemLog())


# --- the maths, by hand --------------------------------------------------------------------------


def test_kl_softmax_and_accuracy_by_hand():
    assert kl_divergence(np.array([0.5, 0.5]), np.array([0.25, 0.75])) == pytest.approx(0.5 * math.log(4 / 3))
    # p = 0 is clipped to 1e-10: 1e-10 · log(1e-10 / 0.5) more
    assert kl_divergence(np.array([1.0, 0.0]), np.array([0.5, 0.5])) == pytest.approx(
        math.log(2) + 1e-10 * math.log(2e-10), abs=1e-15)
    np.testing.assert_allclose(softmax_rows(np.array([[0.0, math.log(3)]]), 1.0), [[0.25, 0.75]])
    np.testing.assert_allclose(softmax_rows(np.array([[0.0, math.log(3)], [5.0, 5.0]]), 2.0), [[0.1, 0.9], [0.5, 0.5]])
    # rows far apart: each its own softmax (the official's global maximum would underflow the second to 0/0)
    np.testing.assert_allclose(softmax_rows(np.array([[0.0, 0.0], [-50.0, -51.0]]), 40.0)[1], [1, math.exp(-40)])
    assert mean_kl(np.array([[0.25, 0.75], [0.5, 0.5]]), np.array([[0.0, math.log(3)], [0.0, 0.0]]), 1.0) == 0.0
    assert trial_correct(np.array([[2, 1, 1, 1], [1, 1, 0, 0], [0, 1, 0, 0.0]])).tolist() == [True, False, False]


def test_fit_beta_finds_the_known_temperature_and_stays_in_bounds():
    # p = softmax(1 · s) exactly: KL 0 at β = 1
    kl, beta = fit_beta(np.array([[0.75, 0.25], [0.1, 0.9]]), np.array([[math.log(3), 0.0], [0.0, math.log(9)]]))
    assert kl == pytest.approx(0, abs=1e-6) and beta == pytest.approx(1, abs=1e-2)
    # p = softmax(2 · s): β = 2; the model's scale is what β absorbs
    kl, beta = fit_beta(np.array([[0.9, 0.1]]), np.array([[math.log(3), 0.0]]))
    assert beta == pytest.approx(2, abs=1e-2)
    # uniform children, a confident model: β as small as allowed
    kl, beta = fit_beta(np.array([[0.5, 0.5]]), np.array([[1.0, 0.0]]))
    q = 1 / (1 + math.exp(-0.025))  # softmax(0.025 · [1, 0])[0]
    assert beta == pytest.approx(0.025, abs=1e-3)
    assert kl == pytest.approx(0.5 * math.log(0.5 / q) + 0.5 * math.log(0.5 / (1 - q)), abs=1e-6)


def test_cosine_and_rsa_by_hand():
    np.testing.assert_allclose(cosine_matrix(np.array([[1.0, 0], [1, 1], [0, 0]])),
                               [[1, 1 / math.sqrt(2), 0], [1 / math.sqrt(2), 1, 0], [0, 0, 0]], atol=1e-12)
    a = np.array([[9, 9, 9], [1, 9, 9], [2, 3, 9.0]])  # lower triangle (1,0), (2,0), (2,1): 1, 2, 3
    b = np.array([[0, 0, 0], [3, 0, 0], [1, 2, 0.0]])  # 3, 1, 2: d = 2, −1, −1, 1 − 6·6 / (3·8) = −0.5
    assert rsa(a, b) == pytest.approx(-0.5)
    assert rsa(a, np.tril(a, -1) + np.triu(np.full((3, 3), -7.0))) == pytest.approx(1.0)  # nor the upper triangle


# --- through the real Scorer ----------------------------------------------------------------------


def test_through_the_scorer_a_missing_image_skips_its_trial_and_scores_align(devbench, tmp_path):
    from vlmerge.config import ModelConfig, TokenizerConfig
    from vlmerge.data import FeatureTable
    from vlmerge.evaluate.run import evaluate, prepare
    from vlmerge.evaluate.scoring import Scorer
    from vlmerge.model import build_config, init_model
    from vlmerge.precompute.tokenizer import train_bpe

    names = ("devbench_vv", "devbench_trog", "devbench_things")
    ids = sorted({r.image for n in names for r in get_task(n).requests(get_task(n).load(devbench, ProblemLog()))})
    ids.remove(f"{VV}/stem.jpg")  # trial 3 of viz_vocab has no feature
    store = tmp_path / "store.h5"
    with h5py.File(store, "w") as f:
        f["features"] = np.random.default_rng(0).normal(size=(len(ids), 8)).astype(np.float32)
        f["null_feature"] = np.zeros(8, dtype=np.float32)
        f["image_ids"] = np.array(ids, dtype=h5py.string_dtype())
    features = FeatureTable(store)
    words = " ".join([*(w for row in VV_MANIFEST for w in row), *(t for t, _ in TROG_MANIFEST), *CONCEPTS])
    tok = train_bpe([words] * 3, TokenizerConfig(vocab_size=300), progress=False)
    model = init_model(build_config(ModelConfig(num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32,
                                                max_length=64), tok, 8), 0)
    problems = ProblemLog()
    tasks = prepare([(get_task(n), devbench) for n in names], features, problems)
    assert [w for w, _ in problems.items] == ["devbench_vv[2]"]
    scorer = Scorer(model, tok, features=features)
    results = {r.task: by_key(r.metrics) for r in evaluate(scorer, tasks, "the model")}
    for t in tasks:  # every request scored alone gives the same metrics
        alone = [scorer.score([r]) for r in t.requests]
        scores = Scores(np.array([s.logprob[0] for s in alone]), np.array([s.tokens[0] for s in alone]))
        want = by_key(t.task.evaluate(t.items, scores)[0])
        assert results[t.task.name].keys() == want.keys()
        for k, (v, n) in want.items():  # β, an arg-min on a flat floor, moves with float rounding
            assert results[t.task.name][k] == (pytest.approx(v, rel=1e-2 if k[1] == "beta" else 0, abs=1e-4), n)
    assert results["devbench_vv"]["", "accuracy"][1] == 3 and results["devbench_vv"]["age_bin:25", "kl"][1] == 3
    assert results["devbench_things"]["", "rsa"][1] == 5 and np.isfinite(results["devbench_things"]["", "rsa"][0])
