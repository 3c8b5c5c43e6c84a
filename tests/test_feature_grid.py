"""`features.grid: G`: a G×G grid of patch means per image, and a model that takes G² image tokens."""

import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, Dinov2Model

from vlmerge.config import ModelConfig, load_config
from vlmerge.data import FeatureTable, Piece, run_data
from vlmerge.errors import VlmergeError
from vlmerge.evaluate.scoring import Scorer
from vlmerge.evaluate.tasks import Request
from vlmerge.merge.statistics.grams import compute_grams
from vlmerge.model import Routed, build_config, init_model
from vlmerge.precompute.encoder import grid_pool, pool
from vlmerge.precompute.features import precompute
from vlmerge.precompute.store import read_store
from vlmerge.problems import ProblemLog

from conftest import FAST_TRAIN, SMALL_WORLD, vlmerge_cli

GRID = ["features.grid=2", "features.num_workers=0"]
TINY = ModelConfig(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, max_length=64)


def test_grid_cells_are_the_means_of_their_patches():
    # CLS + 4 registers, then a 4×4 patch grid of 3-dim tokens
    h = torch.randn(2, 5 + 16, 3, dtype=torch.float64)
    patches = h[:, 5:].reshape(2, 4, 4, 3)  # [B, row, column, D]
    cells = grid_pool(h, 2, num_prefix_tokens=5)
    assert cells.shape == (2, 4, 3)
    for r in range(2):
        for c in range(2):  # row-major cells, each the mean of a 2×2 block of patches
            block = patches[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2]
            torch.testing.assert_close(cells[:, 2 * r + c], block.mean((1, 2)))
    torch.testing.assert_close(grid_pool(h, 1, 5)[:, 0], pool(h, "mean_patch", 5))
    # A grid that does not divide the side: 5×5 patches, 2×2 cells of 3×3 patches sharing the middle row and column
    h = torch.randn(1, 1 + 25, 2, dtype=torch.float64)
    patches = h[:, 1:].reshape(1, 5, 5, 2)
    torch.testing.assert_close(grid_pool(h, 2)[:, 3], patches[:, 2:, 2:].mean((1, 2)))


@pytest.fixture(scope="module")
def grid_root(small_prepared, tmp_path_factory):
    """(config, the small world's grid-1 store): its tokenizer and corpus, with a features.grid=2 store of its own."""
    root = tmp_path_factory.mktemp("grid")
    for rel in ("demo", "runs/demo/tokenizer", "runs/demo/corpus"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(small_prepared / rel, root / rel)
    cfg = load_config(None, [f"paths.root={root}", *SMALL_WORLD, *GRID])
    precompute(cfg, progress=False)
    return cfg, small_prepared / "features" / cfg.store_path.name


def test_a_grid_store_holds_g_squared_cell_means_per_image(grid_root):
    cfg, single_store = grid_root
    ids, feats, null = read_store(cfg.store_path)
    assert feats.shape == (len(ids), 4, 64) and null.shape == (4, 64)
    with h5py.File(cfg.store_path) as f:
        assert f.attrs["grid"] == 2 and f["features"].chunks[1:] == (4, 64)
    # Straight from transformers: 56-pixel images of 14-pixel patches, a 4×4 grid, 2×2 patches a cell
    model = Dinov2Model.from_pretrained(cfg.features.encoder).eval()
    processor = AutoImageProcessor.from_pretrained(cfg.features.encoder)
    images = [Image.open(cfg.root / "demo" / "images" / f"{i}.png").convert("RGB") for i in ids[:6]]
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")
        patches = model(**pixels, output_hidden_states=True).hidden_states[-2][:, 1:].reshape(6, 4, 4, 64)
    want = torch.stack([patches[:, r : r + 2, c : c + 2].mean((1, 2)) for r in (0, 2) for c in (0, 2)], 1)
    np.testing.assert_allclose(feats[:6], want.numpy(), atol=1e-5, rtol=0)
    # Equal cells: their mean is the single vector of a grid-1 store (the paper's feature)
    single_ids, single, single_null = read_store(single_store)
    assert single_ids == ids
    np.testing.assert_allclose(feats.mean(1), single, atol=1e-5, rtol=0)
    np.testing.assert_allclose(null.mean(0), single_null, atol=1e-5, rtol=0)


def test_a_store_of_another_grid_is_refused(grid_root):
    cfg, single_store = grid_root
    with pytest.raises(VlmergeError, match="exists and was made from other inputs"):
        precompute(load_config(None, [f"paths.root={cfg.root}", *SMALL_WORLD, "features.num_workers=0"]),
                   progress=False)
    # The small world's grid-1 store, copied from its root into this one, whose encoder sits at the same
    # place under the root (fingerprints are root-relative): taken as it is, refused for grid 2
    single = shutil.copy(single_store, cfg.root / "features" / "single.h5")
    same = [f"paths.root={cfg.root}", *SMALL_WORLD, "features.num_workers=0", "features.name=single"]
    assert precompute(load_config(None, same), progress=False) == single
    with pytest.raises(VlmergeError, match="exists and was made from other inputs"):
        precompute(load_config(None, [*same, "features.grid=2"]), progress=False)


def test_a_grid_finer_than_the_patches_or_longer_than_the_model_s_context_is_refused(grid_root):
    cfg, _ = grid_root
    common = [f"paths.root={cfg.root}", *SMALL_WORLD, "features.num_workers=0"]
    with pytest.raises(VlmergeError, match="features.grid: 5 exceeds the encoder's 4×4 patch grid"):
        precompute(load_config(None, [*common, "features.grid=5", "features.name=g5"]), progress=False)
    g3 = load_config(None, [*common, "features.grid=3", "features.name=g3", "model.max_length=10"])
    precompute(g3, progress=False)  # 3×3 cells of a 4×4 grid: overlapping cells, 9 image tokens
    with pytest.raises(VlmergeError, match="model.max_length: 10 leaves no room for text after BOS and the store's 9"):
        run_data(g3, ["text"], ProblemLog())


def test_the_collator_gives_every_sample_four_image_tokens_out_of_the_loss(grid_root):
    cfg, _ = grid_root
    data = run_data(cfg, ["text", "captions"], ProblemLog())
    s = data.samples
    picked = [int(np.flatnonzero(s.feature_row < 0)[0]), int(np.flatnonzero(s.feature_row >= 0)[0])]  # text, caption
    pieces = [Piece(i, 0, int(s.words[i])) for i in picked]
    batch = data.collate(pieces)
    image = data.tokenizer.convert_tokens_to_ids(data.tokenizer.image_token)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert (ids[:, 0] == data.tokenizer.bos_token_id).all() and (ids[:, 1:5] == image).all()
    assert (ids[:, 5:] != image).all()
    assert (labels[:, :5] == -100).all() and (labels[:, 5][mask[:, 5] == 1] != -100).all()
    assert batch["pixel_values"].shape == (2, 4, 64)
    assert torch.equal(batch["pixel_values"][0], data.features.null)  # the text sample: the black image's cells
    assert torch.equal(batch["pixel_values"][1], data.features.features[s.feature_row[picked[1]]].float())
    assert data.collate.tokens_in(pieces) == int(mask.sum()) - 2 * 5  # text + EOS only


@pytest.fixture(scope="module")
def grid_model(grid_root):
    cfg, _ = grid_root
    tokenizer = AutoTokenizer.from_pretrained(cfg.layout.tokenizer_dir)
    features = FeatureTable(cfg.store_path)
    return init_model(build_config(TINY, tokenizer, features.dim, image_tokens=features.tokens), 3), tokenizer, features


def test_every_image_token_reads_its_own_cell(grid_model):
    model, tokenizer, features = grid_model
    assert model.config.image_seq_length == 4
    image = model.config.image_token_index
    ids = torch.tensor([[tokenizer.bos_token_id] + [image] * 4 + [20, 21, 22]] * 2)
    pixels = torch.randn(2, 4, features.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
        for cell in range(4):
            other = pixels.clone()
            other[0, cell] += 1
            changed = model(input_ids=ids, pixel_values=other).logits
            assert not torch.allclose(changed[0, 5:], logits[0, 5:])  # the text reads this cell
            assert torch.equal(changed[1], logits[1])


def test_regmean_grams_of_the_projector_sum_every_cell_of_every_image(grid_model):
    model, tokenizer, features = grid_model
    ids = torch.tensor([[tokenizer.bos_token_id] + [model.config.image_token_index] * 4 + [20, 21, 22]] * 2)
    mask = torch.ones_like(ids)
    mask[1, -1] = 0  # padding: not a text position, but the image's cells are all data
    pixels = features.features[[0, 1]].float()
    grams, _ = compute_grams(model, [{"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}])
    cells = pixels.reshape(8, features.dim).double()
    torch.testing.assert_close(grams["model.multi_modal_projector.linear_1.weight"], cells.T @ cells)


def test_the_expert_model_routes_a_grid_sample_as_text_only_when_every_cell_is_the_null(grid_model):
    _, tokenizer, features = grid_model
    mc = TINY.model_copy(update={"experts": "all", "cross_modal_layers": 1})
    model = init_model(build_config(mc, tokenizer, features.dim, image_tokens=4, experts=True), 3)
    model.null_feature = features.null
    ids = torch.tensor([[tokenizer.bos_token_id] + [model.config.image_token_index] * 4 + [20, 21]] * 3)
    pixels = features.null.expand(3, 4, features.dim).clone()  # sample 1: the black image, every cell
    pixels[0] = features.features[3].float()
    pixels[2, 3] += 1  # sample 2: one cell differs from the black image's
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pixels)
    top = next(m for m in model.model.language_model.layers[-1].modules() if isinstance(m, Routed))
    assert top.route[:, 5:].tolist() == [[2, 2], [1, 1], [2, 2]]  # cross-modal, language, cross-modal


def test_scores_equal_a_forward_of_bos_four_image_tokens_and_the_sentence(grid_model):
    model, tokenizer, features = grid_model
    image = model.config.image_token_index
    sentences = ["the red ball is on the box .", "a small cat sees the dog ."]
    stored = str(features.index[3])
    requests = [Request(sentences[0]), Request(sentences[1], image=stored),
                Request(" box .", context="the red ball is on the", image=stored)]
    got = Scorer(model, tokenizer, features=features).score(requests).logprob
    legacy = Scorer(model, tokenizer, features=features, prompt="legacy").score(requests).logprob

    def reference(context: list[int], target: list[int], feature: torch.Tensor) -> float:
        ids = [tokenizer.bos_token_id] + [image] * 4 + context + target
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids]), pixel_values=feature[None]).logits[0].log_softmax(-1)
        first = len(ids) - len(target)
        return sum(logp[i - 1, ids[i]].item() for i in range(first, len(ids)))

    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    cell = features.features[3].float()
    # takmaz2025: "<image>"×4 + " " + sentence, every token of the sentence scored
    assert got[0] == pytest.approx(reference([], encode(" " + sentences[0]), features.null), abs=1e-4)
    assert got[1] == pytest.approx(reference([], encode(" " + sentences[1]), cell), abs=1e-4)
    # legacy: context and target tokenised apart, the target's tokens scored
    assert legacy[2] == pytest.approx(reference(encode(requests[2].context), encode(" box ."), cell), abs=1e-4)


def test_a_store_whose_grid_is_not_the_model_s_is_refused_in_one_line(grid_model, grid_root):
    model, tokenizer, features = grid_model
    single = FeatureTable(grid_root[1])
    with pytest.raises(VlmergeError) as e:
        Scorer(model, tokenizer, features=single)
    assert "1 image tokens per image but the model takes 4" in str(e.value) and "\n" not in str(e.value)
    one_token = init_model(build_config(TINY, tokenizer, features.dim), 3)
    with pytest.raises(VlmergeError, match="gives 4 image tokens per image but the model takes 1"):
        Scorer(one_token, tokenizer, features=features)


@pytest.mark.slow
def test_train_and_evaluate_on_a_grid_store(grid_root, tmp_path):
    import pandas as pd
    from safetensors.torch import load_file

    from vlmerge.layout import list_checkpoints

    cfg, single_store = grid_root
    common = [f"paths.root={cfg.root}", *SMALL_WORLD, *FAST_TRAIN, *GRID, "train.epochs=1", "runs.multimodal.epochs=1"]
    r = vlmerge_cli("train", "--quiet", "--run", "multimodal", *common)
    assert r.returncode == 0, r.stderr
    checkpoints = list_checkpoints(cfg.layout.run_dir("multimodal"))
    first, last = checkpoints[0], checkpoints[-1]
    assert json.loads((last / "config.json").read_text())["image_seq_length"] == 4
    projector = [load_file(c / "model.safetensors")["model.multi_modal_projector.linear_1.weight"] for c in (first, last)]
    assert not torch.equal(*projector)  # the projector learnt from the cells
    r = vlmerge_cli("eval", "--quiet", "--model", str(last), "--task", "winoground", "--out", str(tmp_path / "e"),
                    *common)
    assert r.returncode == 0, r.stderr
    r = vlmerge_cli("statistics", "--quiet", "--statistic", "grams", "--checkpoint", str(last), *common)  # RegMean reads the grid batches too
    assert r.returncode == 0, r.stderr
    rows = pd.read_parquet(tmp_path / "e" / "results.parquet")
    assert rows[rows.metric == "unpaired_accuracy"].value.between(0, 1).all()
    # The grid-1 store of the same images is refused before any scoring
    r = vlmerge_cli("eval", "--quiet", "--model", str(last), "--task", "winoground", "--out", str(tmp_path / "f"),
                    "--features", str(single_store), *common)
    assert r.returncode == 2 and "1 image tokens per image but the model takes 4" in r.stderr.strip().splitlines()[-1]
