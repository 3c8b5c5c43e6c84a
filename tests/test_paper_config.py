"""configs/babylm-takmaz2025.yaml against Takmaz, Bylinina & Dotlačil (BabyLM 2025): each setting the
paper states, row by row, is the config's value, or the config documents why it differs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO
from vlmerge.config import load_config

PAPER = REPO / "configs" / "babylm-takmaz2025.yaml"
OSF = REPO / "configs" / "babylm-takmaz2025-osf.yaml"
cfg = load_config(PAPER)
TEXT = PAPER.read_text()


def test_tokenizer_llava_bpe_with_a_bert_pre_tokenizer_and_30000_tokens():
    assert (cfg.tokenizer.recipe, cfg.tokenizer.vocab_size) == ("llava_bpe", 30000)
    assert "§4, fn. 7" in TEXT and "1.36 subwords per word" in TEXT


def test_max_length_150_optimiser_adamw_1e4_fp16_and_a_batch_of_512():
    from vlmerge.train.loop import _optimizer
    from vlmerge.train.schedule import batch_shape

    assert cfg.model.max_length == 150
    assert (cfg.train.lr, cfg.train.precision) == (1e-4, "fp16")
    assert isinstance(_optimizer(torch.nn.Linear(2, 2), cfg), torch.optim.AdamW)
    t = cfg.train
    assert batch_shape(t.micro_batch_size, t.grad_accum, t.global_batch, world=2) == (512, 8)  # 2 × 32 × 8


def test_ten_epochs_the_multimodal_twin_on_text_and_captions_the_text_twin_on_text():
    assert cfg.train.epochs == 10 and cfg.runs.multimodal.epochs is None and cfg.runs.text.epochs is None
    assert cfg.runs.text.sources == ["text"] and cfg.runs.multimodal.sources == ["text", "captions"]


def test_the_projector_is_linear_1024_to_768_gelu_linear_768_to_768():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from vlmerge.model import build_config, init_model

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    small = cfg.model.model_copy(update={"num_layers": 1})  # the projector does not depend on the depth
    projector = init_model(build_config(small, tok, 1024, cfg.features.layer), 0).model.multi_modal_projector
    assert (projector.linear_1.in_features, projector.linear_1.out_features) == (1024, 768)
    assert (projector.linear_2.in_features, projector.linear_2.out_features) == (768, 768)
    assert type(projector.act).__name__ == "GELUActivation"


def test_the_black_images_size_has_no_effect_after_dinov2s_processor():
    from PIL import Image
    from transformers import BitImageProcessor

    # DINOv2's preprocessing: the short side to 256, a 224 centre crop, ImageNet normalisation
    processor = BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                  do_center_crop=True, image_mean=[0.485, 0.456, 0.406],
                                  image_std=[0.229, 0.224, 0.225], do_convert_rgb=True)
    paper, square = (processor(images=[Image.new("RGB", size)], return_tensors="pt")["pixel_values"]
                     for size in ((640, 420), (224, 224)))
    assert torch.equal(paper, square)
    assert "640×420" in TEXT


def test_images_encoded_with_dinov2_large_here_and_the_releases_dinov2_base_vectors_apart():
    assert cfg.features.images and not cfg.features.imports  # the paper re-encoded the images (§4)
    assert (cfg.features.layer, cfg.features.pooling, cfg.features.grid) == (-2, "mean_patch", 1)
    osf = load_config(OSF)
    assert {imp.encoder for imp in osf.features.imports} == {"facebook/dinov2-base"}
    assert osf.model == cfg.model and osf.train == cfg.train  # the same setup over the other vectors
    assert "768-d" in OSF.read_text()


def test_the_data_split_and_word_counts_are_documented_where_they_differ():
    assert "Table 1" in TEXT and "95/5" in TEXT and "vlmerge reads the split you give it" in TEXT
    assert cfg.data.dev_text and cfg.data.dev_captions and "`vlmerge corpus` prints" in TEXT
    assert cfg.checkpoints.words == "babylm" and cfg.checkpoints.every_epoch
    assert "subwords ÷ 1.36" in TEXT and "counts the whitespace words" in TEXT


def test_best_text_pairing_and_the_papers_alphas():
    assert (cfg.sweep.pairing, cfg.sweep.best_text_task) == ("best_text", "blimp")
    assert cfg.sweep.best_text_data.endswith("full_eval/blimp_filtered")  # picked on the full BLiMP
    assert {0.0, 0.3, 0.5, 0.8} <= set(cfg.sweep.alphas) and [m.name for m in cfg.sweep.methods] == ["linear"]


def test_evaluation_on_babylms_fast_sets_and_winoground():
    fast = {"blimp": "blimp_fast", "blimp_supplement": "supplement_fast", "ewok": "ewok_fast",
            "entity_tracking": "entity_tracking_fast", "wug_adj": "wug_adj_nominalization",
            "wug_past": "wug_past_tense"}
    for task, folder in fast.items():
        assert cfg.eval.tasks[task].endswith(f"fast_eval/{folder}"), task
    # the paper's full Hugging Face Winoground (its unpaired text score) beside BabyLM's filtered one
    assert cfg.eval.tasks["winoground_full"].endswith("winoground/data/examples.jsonl")
    assert cfg.eval.tasks["winoground"].endswith("full_eval/winoground_filtered") and "400 items × 2" in TEXT
    assert cfg.analysis.multimodal_tasks["winoground_full"] == "unpaired_accuracy"
    assert cfg.eval.prompt == "takmaz2025"


def test_the_rehearsal_keeps_the_papers_shapes_and_protocol_on_a_cpu():
    rehearsal = load_config(REPO / "configs" / "rehearsal-takmaz2025.yaml")
    m = rehearsal.model
    assert (m.num_layers, m.hidden_size, m.vocab_size, m.max_length) == (6, 768, 30000, 150)
    assert rehearsal.tokenizer == cfg.tokenizer and rehearsal.features.device == "auto"
    assert (rehearsal.train.precision, rehearsal.eval.dtype) == ("fp32", "fp32")
    same = ("lr", "global_batch", "micro_batch_size", "epochs")
    assert [getattr(rehearsal.train, k) for k in same] == [getattr(cfg.train, k) for k in same]
    assert (rehearsal.sweep.pairing, rehearsal.sweep.alphas) == ("best_text", [0.0, 0.3, 0.5, 0.8, 1.0])
    # the tasks the demo world lacks are dropped from the paper's, the rest point into the rehearsal's root
    assert set(rehearsal.eval.tasks) == {"blimp", "winoground_full", "entity_tracking", "wug_adj"}
    assert all(path.startswith(str(rehearsal.root)) for path in rehearsal.eval.tasks.values())
    assert rehearsal.eval.features is None and rehearsal.root != cfg.root


def test_every_section_is_cited():
    comments = [line for line in TEXT.splitlines() if line.lstrip().startswith("#")]
    for section in ("§3", "§4", "§5", "§6"):
        assert any(section in line for line in comments), section
    assert yaml.safe_load(TEXT)["experiment"] == "babylm-takmaz2025"


@pytest.mark.slow
def test_the_rehearsal_runs_every_stage_and_ends_with_the_papers_views(tmp_path):
    # `make rehearsal` at toy widths: the same config, driver and stages, in seconds instead of 30 minutes
    root = tmp_path / "root"
    small = [f"paths.root={root}", "model.num_layers=1", "model.hidden_size=32", "model.num_heads=2",
             "model.intermediate_size=64", "model.vocab_size=1000", "demo.text_words=1000", "demo.n_images=100",
             "demo.n_winoground=8", "checkpoints.words=[2000,4000]", "train.global_batch=64"]
    run = subprocess.run([sys.executable, str(REPO / "tests/bench/rehearsal.py"), "--fast", "2", "--full", "3", *small],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((root / "rehearsal.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["demo world", "tokenizer", "corpus", "features", "train text",
                                                       "train multimodal", "estimate", "best text", "sweep", "report"]
    assert all(s["seconds"] > 0 and s["peak_rss_bytes"] > 2**20 for s in summary["stages"])
    assert summary["blimp_pairs"] == {"fast": 2 * 67, "full": 3 * 67}
    assert summary["runs"]["multimodal"]["checkpoints"] == [0, 2000, 4000] and summary["sweep"]["predicted_seconds"] > 0
    views = (root / "reports/rehearsal-takmaz2025/takmaz2025.md").read_text()
    for view in ("Fig. 3", "Fig. 10", "Fig. 11", "74.82 (at 100M words)"):
        assert view in views, view
    assert "not drawn" not in views and "/blimp/full (the best-text data)" in views
    html = (root / "reports/rehearsal-takmaz2025/report.html").read_text()
    assert "Takmaz et al. 2025: the paper&#x27;s views" in html and html.count("takmaz2025-fig") == 0  # embedded
