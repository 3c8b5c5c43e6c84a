"""The scoring engine: the summed log-probability of a completion after its context, batched.

The default prompts follow the BabyLM 2025 evaluation pipeline (github.com/babylm/
evaluation-pipeline-2025), so that scores compare with the leaderboard:

- `text` (sentence_zero_shot/dataset.py `CompletionRankingDataset.process_causal_sentences`
  and `get_causal_collate_fn`): the whole sentence (context + completion) is tokenised at
  once by the model's tokenizer with its own special tokens (no BOS unless the tokenizer adds
  one) and offset mapping; the completion's score is the sum of the log-probabilities of the
  tokens whose character span ends after the completion's first character (`end >
  len(sentence) - len(completion) + offset_mapping[0][0]`). The first token is never scored:
  the collate function predicts tokens[1:] from tokens[:-1].
- `takmaz2025` (Takmaz et al.'s fork, github.com/ecekt/evaluation-pipeline-2025, the same
  function): the model's BOS, then `"<image> " + sentence` tokenised without special tokens,
  the same span rule; the image token carries the request's image feature, or the store's
  null feature (a black image through the encoder) for text-only tasks. A model of K image
  tokens per image (`config.image_seq_length`, a `features.grid` store's G²) reads `<image>`
  K times, then the space.
- `legacy`: this project's earlier convention, kept as a named option: BOS and the `<image>`
  token(s), then the context and the completion tokenised separately, every completion token
  scored.
- `auto` (the default): `takmaz2025` for a model with an image token, else `text`.

Requests are tokenised once. The candidates of an item that share an image share a row: their
common token prefix once, then each candidate's own tokens, each attending to the prefix and to
itself only (a tree-shaped attention mask, each token at its own sequence's position), so the
prefix (the prompt, a shared context, a minimal pair's first words) is computed once
(`share_prefix`; every score is the one its sequence alone gives, up to float rounding). Rows are
sorted by length and packed into batches, so that padding is small and every forward is full.
bf16 runs the model with bf16 weights and keeps the log-softmax in fp32. Logits are computed
only at the positions whose next token is scored (not at the prompt, the context or padding).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from vlmerge.data import FeatureTable
from vlmerge.errors import VlmergeError
from vlmerge.evaluate.tasks import Request, Scores


# Rows of logits per log-softmax call. CPU: a chunk (64 × a 16k vocabulary in fp32, 4 MiB) stays in
# cache between the max, exp-sum and gather passes; the whole batch's logits would not. GPU: few
# launches matter more (4096 × 16k in fp32 is 256 MiB of scratch).
_CHUNK = {"cpu": 64, "cuda": 4096}
# eval.batch_size and eval.batch_tokens when "auto", per device type: a CPU is not swamped by long
# rows (activations stay within its caches' reach); a GPU is kept full by the token budget alone.
AUTO_BATCH = {"cpu": (64, 16384), "cuda": (None, 65536)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPTS = ("auto", "takmaz2025", "text", "legacy")
IMAGE_TOKEN = "<image>"  # Takmaz et al.: every prompt starts with the image token and a space


def resolve_prompt(prompt: str, image_token: int | None) -> str:
    """`eval.prompt` for a model with (or without) an image token: auto -> takmaz2025 or text."""
    if prompt not in PROMPTS:
        raise VlmergeError(f"eval.prompt {prompt!r}: expected one of {', '.join(PROMPTS)}")
    resolved = prompt if prompt != "auto" else "text" if image_token is None else "takmaz2025"
    if resolved == "takmaz2025" and image_token is None:
        raise VlmergeError("eval.prompt takmaz2025 needs a model with an image token (use text)")
    return resolved


def completion_span(offsets: Sequence[tuple[int, int]], start_char: int) -> tuple[int, int]:
    """(first, stop): the tokens 1… whose character span ends after `start_char`, the
    completion's first character (BabyLM's phrase mask; token 0 is never predicted).

    The scored tokens must be one run; tokens after it (a trailing special token, whose span
    is (0, 0)) are not scored and, the model being causal, need not be run at all.
    """
    hits = [i for i, (_, end) in enumerate(offsets) if i >= 1 and end > start_char]
    if not hits:
        return len(offsets), len(offsets)
    if hits[-1] - hits[0] + 1 != len(hits):
        raise VlmergeError(f"the completion's tokens are not one run (token offsets {list(offsets)})")
    return hits[0], hits[-1] + 1


def target_logprobs(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[e]) under logits[rows[e]] (`logits` `[N, V]`, any float dtype), in fp32.

    A row may serve several entries (a shared prefix's position predicts each candidate's token).
    """
    lse = torch.empty(len(logits), dtype=torch.float32, device=logits.device)
    chunk = _CHUNK.get(logits.device.type, _CHUNK["cpu"])
    for i in range(0, len(logits), chunk):
        lse[i : i + chunk] = torch.logsumexp(logits[i : i + chunk].float(), dim=-1)
    return logits[rows, targets].float() - lse[rows]


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """The number of leading tokens all `seqs` share."""
    n = min(map(len, seqs))
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def tree_mask(segments: torch.Tensor) -> torch.Tensor:
    """`[R, 1, W, W]` bool attention of packed rows: a token sees the earlier tokens of the shared
    prefix (segment 0) and of its own segment. `segments` `[R, W]`: 0 prefix, c + 1 candidate c,
    -1 padding (which sees the prefix and earlier padding, so that no row of the mask is empty)."""
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    same = (segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None])
    return (causal & same)[:, None]


@dataclasses.dataclass(frozen=True)
class Batch:
    """One forward: packed rows, right-padded, and the scored tokens as entries."""

    requests: np.ndarray  # [Q] the requests it scores
    images: list[str | None]  # [R] each row's image
    ids: torch.Tensor  # [R, W]
    positions: torch.Tensor  # [R, W] each token's position in its own sequence
    segments: torch.Tensor  # [R, W] see tree_mask
    keep: torch.Tensor  # [R, W] bool: the positions whose logits are read
    rows: torch.Tensor  # [E] the kept position (flattened, row-major) that predicts entry e
    targets: torch.Tensor  # [E] the token entry e scores
    owners: torch.Tensor  # [E] the request (index into `requests`) entry e adds to

    def pinned(self) -> Batch:
        """The same batch in page-locked host memory, which a GPU copies from without blocking."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


def pack_batch(seqs: Sequence[Sequence[int]], target_lengths: Sequence[int], packs: Sequence[Sequence[int]],
               images: Sequence[str | None], pad: int) -> Batch:
    """The Batch of `packs` (lists of indices into `seqs`), one row each: the pack's common prefix,
    then each member's remaining tokens. A sequence's last `target_lengths` tokens are scored."""
    members = [q for pack in packs for q in pack]
    local = {q: k for k, q in enumerate(members)}
    layout = []  # per row: (ids, positions, segments, shared prefix length)
    for pack in packs:
        shared = common_prefix([seqs[q] for q in pack]) if len(pack) > 1 else 0
        ids, pos, seg = list(seqs[pack[0]][:shared]), list(range(shared)), [0] * shared
        for c, q in enumerate(pack):
            own = seqs[q][shared:]
            ids += own
            pos += range(shared, shared + len(own))
            seg += [c + 1] * len(own)
        layout.append((ids, pos, seg, shared))
    width = max(len(ids) for ids, *_ in layout)
    out_ids = np.full((len(packs), width), pad, dtype=np.int64)
    out_pos = np.zeros((len(packs), width), dtype=np.int64)
    out_seg = np.full((len(packs), width), -1, dtype=np.int64)
    keep = np.zeros((len(packs), width), dtype=bool)
    entries = []  # (row, column, target, owner)
    for r, (pack, (ids, pos, seg, shared)) in enumerate(zip(packs, layout)):
        n = len(ids)
        out_ids[r, :n], out_pos[r, :n], out_seg[r, :n] = ids, pos, seg
        start = shared
        for q in pack:
            seq = seqs[q]
            for j in range(max(1, len(seq) - target_lengths[q]), len(seq)):  # token j is predicted at j - 1
                col = j - 1 if j - 1 < shared else start + (j - 1 - shared)
                keep[r, col] = True
                entries.append((r, col, seq[j], local[q]))
            start += len(seq) - shared
    flat = np.cumsum(keep.ravel()) - 1  # the kept logits come flattened, row-major
    e = np.array(entries, dtype=np.int64).reshape(-1, 4)
    return Batch(np.array(members, dtype=np.int64), [images[pack[0]] for pack in packs],
                 torch.from_numpy(out_ids), torch.from_numpy(out_pos), torch.from_numpy(out_seg),
                 torch.from_numpy(keep), torch.from_numpy(flat[e[:, 0] * width + e[:, 1]]),
                 torch.from_numpy(e[:, 2].copy()), torch.from_numpy(e[:, 3].copy()))


def batch_limits(device: torch.device, batch_size: int | str, batch_tokens: int | str) -> tuple[int | None, int | None]:
    """(requests, padded tokens) per batch at most (None: no limit), "auto" resolved for the device."""
    size, tokens = AUTO_BATCH.get(device.type, AUTO_BATCH["cpu"])
    return (size if batch_size == "auto" else int(batch_size)), (tokens if batch_tokens == "auto" else int(batch_tokens))


def group_batches(groups: Sequence[tuple[int, Sequence[int]]], max_requests: int | None,
                  max_tokens: int | None) -> list[list[int]]:
    """Groups, each (requests, its rows' lengths), into batches of group indices, in order: a batch
    takes the next group while its requests stay within `max_requests` and its padded tokens (rows ×
    the longest row) within `max_tokens` (None: no limit); a group over a limit is a batch alone."""
    batches: list[list[int]] = []
    requests = rows = width = 0
    for g, (n, lengths) in enumerate(groups):
        w = max(lengths)
        if batches and (max_requests is None or requests + n <= max_requests) and (
                max_tokens is None or (rows + len(lengths)) * max(width, w) <= max_tokens):
            batches[-1].append(g)
            requests, rows, width = requests + n, rows + len(lengths), max(width, w)
        else:
            batches.append([g])
            requests, rows, width = n, len(lengths), w
    return batches


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the model's floating parameters to `dtype` in place (buffers such as rotary
    frequencies stay as they are). Weights written later with `copy_` (the sweep's merges,
    computed in fp32) are cast on the way in."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Requests tokenised (prefix + context + target) and packed into batches."""

    requests: list[Request]
    target_lengths: list[int]
    batches: list[Batch]
    owners: np.ndarray  # the request each batched sequence adds to (a word by subword: one per subword)
    # the requests with a sequence longer than the scorer's max_tokens: not batched, and not scored
    too_long: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class GreedyScores(Scores):
    """Scores, and whether every scored token of each request is its position's argmax (`score(greedy=True)`)."""

    greedy: np.ndarray  # bool


class Scorer:
    """Scores requests with one model; the model may be rewritten in place between calls (sweep).

    The model runs in `dtype`: its floating parameters are cast in place, once, here (a bf16
    scorer leaves the caller's model in bf16; score an fp32 copy for fp32).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, features: FeatureTable | None = None,
                 prompt: str = "auto", dtype: str = "fp32", batch_size: int | str = "auto",
                 batch_tokens: int | str = "auto", share_prefix: bool = True, max_tokens: int | None = None):
        self.model, self.tokenizer, self.features = model.eval(), tokenizer, features
        self.share_prefix = share_prefix
        image_token = getattr(model.config, "image_token_index", None)
        self.prompt = resolve_prompt(prompt, image_token)
        self.use_image = self.prompt != "text" and image_token is not None
        if self.use_image and features is None:
            raise VlmergeError("a multimodal model needs the feature store (its null feature at least)")
        # Image tokens per image: 1, or G² for a model trained on a store of features.grid G
        self.image_tokens = getattr(model.config, "image_seq_length", 1)
        if self.use_image and features.tokens != self.image_tokens:
            raise VlmergeError(f"the feature store gives {features.tokens} image tokens per image but the model "
                               f"takes {self.image_tokens}; use the features.grid the model was trained with")
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        # legacy: our own prefix; takmaz2025: the fork prepends the tokenizer's BOS when it has one
        self.prefix = {"legacy": [bos] + [image_token] * self.image_tokens if self.use_image else [bos],
                       "takmaz2025": [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id],
                       "text": []}[self.prompt]
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos
        if dtype not in DTYPES:
            raise VlmergeError(f"--dtype {dtype!r}: expected fp32 or bf16")
        self.dtype = dtype
        # The model's positions (lm-eval's max_length: the harness's windows), and the longest sequence
        # scored at all: a memory guard, as a text's attention grows with its square (the official
        # pipeline scores every item whole, past trained RoPE positions too: keep it above the data's).
        self.max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.max_tokens = max_tokens
        cast_parameters(model, DTYPES[dtype])
        self.device = next(model.parameters()).device
        self.batch_size, self.batch_tokens = batch_limits(self.device, batch_size, batch_tokens)
        self._cuda = self.device.type == "cuda"
        self._null = features.null.to(self.device) if features is not None else None
        self._memo: dict[int, tuple[list[Request], Prepared]] = {}

    def prepared(self, requests: list[Request]) -> Prepared:
        """`prepare`, remembered per request list (the sweep scores the same list at every α)."""
        hit = self._memo.get(id(requests))
        if hit is None or hit[0] is not requests:
            hit = self._memo[id(requests)] = (requests, self.prepare(requests))
        return hit[1]

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        unique = list(dict.fromkeys(texts))
        ids = self.tokenizer(unique, add_special_tokens=False)["input_ids"] if unique else []
        table = dict(zip(unique, ids))
        return [table[t] for t in texts]

    def _batches(self, requests: Sequence[Request], seqs: list[list[int]], target_lengths: list[int]) -> list[Batch]:
        """Whole groups, longest row first, within the batch limits (`group_batches`). With
        share_prefix, the requests of a group that share an image share a row. On a GPU the
        batches are pinned, once: the sweep copies them to the device at every α."""
        groups: dict[int, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[r.group].append(i)
        images = [r.image for r in requests]

        def packs(group: list[int]) -> list[list[int]]:
            if not self.share_prefix:
                return [[q] for q in group]
            by_image: dict[str | None, list[int]] = defaultdict(list)
            for q in group:
                by_image[images[q]].append(q)
            return list(by_image.values())

        def row_length(pack: list[int]) -> int:
            shared = common_prefix([seqs[q] for q in pack])
            return shared + sum(len(seqs[q]) - shared for q in pack)

        ordered = sorted(([(p, row_length(p)) for p in packs(g)] for g in groups.values()),
                         key=lambda rows: -max(length for _, length in rows))
        sizes = [(sum(len(p) for p, _ in rows), [length for _, length in rows]) for rows in ordered]
        batches = [pack_batch(seqs, target_lengths, [p for g in b for p, _ in ordered[g]], images, self.pad)
                   for b in group_batches(sizes, self.batch_size, self.batch_tokens)]
        return [b.pinned() for b in batches] if self._cuda else batches

    def _with_offsets(self, texts: Sequence[str]) -> dict[str, tuple[list[int], list[tuple[int, int]]]]:
        """text -> (ids, offsets), with the model's own special tokens under the `text` prompt."""
        unique = list(dict.fromkeys(texts))
        if not unique:
            return {}
        enc = self.tokenizer(unique, add_special_tokens=self.prompt == "text", return_offsets_mapping=True)
        return {t: (list(i), [tuple(o) for o in offs]) for t, i, offs in zip(unique, enc["input_ids"], enc["offset_mapping"])}

    def _spans(self, requests: Sequence[Request]) -> tuple[list[list[int]], list[int], list[int]]:
        """The BabyLM rule: (ids up to the completion's last token, completion tokens, its request) per
        scored sequence, one per request but a word scored `by_subword` (one per subword)."""
        # Takmaz et al.'s "<image> "; K image tokens: the image token K times, then the space
        lead = IMAGE_TOKEN * self.image_tokens + " " if self.prompt == "takmaz2025" else ""
        steps = self._subword_steps([(i, lead + r.context, r.target) for i, r in enumerate(requests) if r.by_subword])
        whole = [(i, r) for i, r in enumerate(requests) if not r.by_subword]
        texts = [lead + r.context + r.target for _, r in whole]
        table = self._with_offsets(texts + [context for _, context, _ in steps])
        seqs, lengths = [], []
        for (_, r), text in zip(whole, texts):
            ids, offsets = table[text]
            ids, offsets = self.prefix + list(ids), [(0, 0)] * len(self.prefix) + list(offsets)
            # text: the pipeline's `+ offset_mapping[start_idx][0]`; the fork adds nothing
            shift = offsets[0][0] if self.prompt == "text" and offsets else 0  # an empty text has none
            first, stop = completion_span(offsets, len(text) - len(r.target) + shift)
            seqs.append(ids[:stop])
            lengths.append(stop - first)
        owners = [i for i, _ in whole]
        for i, context, target in steps:
            seqs.append(self.prefix + table[context][0] + [target])
            lengths.append(1)
            owners.append(i)
        return seqs, lengths, owners

    def _subword_steps(self, words: Sequence[tuple[int, str, str]]) -> list[tuple[int, str, int]]:
        """(request, context, token) of every subword of every (request, context, word): the word's
        first token after the context; then each next subword after the context extended by the
        decoded subwords before it, retokenised, as the first token of that subword decoded and
        encoded alone (reading/evaluation_functions.py `get_p2`, whose sentence + decoded subword may
        merge across the join, e.g. "the" + "m", or hold a partial UTF-8 character's "\ufffd")."""
        out = []
        for (i, context, _), target in zip(words, self._encode([word for _, _, word in words])):
            pieces = [self.tokenizer.decode(t) for t in target]
            firsts = [target[0]] + [ids[0] if ids else t for ids, t in zip(self._encode(pieces[1:]), target[1:])]
            for k, token in enumerate(firsts):
                out.append((i, context + "".join(pieces[:k]), token))
        return out

    def prepare(self, requests: Sequence[Request]) -> Prepared:
        """Tokenise and batch once; a sweep scores the same requests at every α."""
        return self.prepare_sequences(requests, *self.sequences(requests))

    def sequences(self, requests: Sequence[Request]) -> tuple[list[list[int]], list[int], list[int]]:
        """(token ids, how many of its last tokens are scored, its request) of every sequence `score`
        runs: one per request, one per subword of a word scored `by_subword`."""
        if self.prompt == "legacy":
            contexts = self._encode([r.context for r in requests])
            targets = self._encode([r.target for r in requests])
            seqs = [self.prefix + c + t for c, t in zip(contexts, targets)]
            return seqs, [len(t) for t in targets], list(range(len(requests)))
        return self._spans(requests)

    def prepare_sequences(self, requests: Sequence[Request], seqs: Sequence[Sequence[int]], lengths: Sequence[int],
                          owners: Sequence[int]) -> Prepared:
        """Batch sequences as `sequences` gives them (or windows of them: lm-eval's rolling log-likelihood);
        the requests with a sequence longer than `max_tokens` are left out (`Prepared.too_long`)."""
        owners = np.array(owners, dtype=np.int64)
        per_request = np.bincount(owners, weights=lengths, minlength=len(requests)).astype(np.int64).tolist()
        over = np.array([self.max_tokens is not None and len(s) > self.max_tokens for s in seqs], dtype=bool)
        too_long = np.unique(owners[over])
        if too_long.size:
            kept = np.flatnonzero(~np.isin(owners, too_long))
            owners, seqs, lengths = owners[kept], [seqs[i] for i in kept], [lengths[i] for i in kept]
        return Prepared(list(requests), per_request, self._batches([requests[o] for o in owners], seqs, lengths),
                        owners, too_long)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        # Host tensors of a GPU scorer are pinned: the copy is queued, and the host goes on.
        return t.to(self.device, non_blocking=self._cuda)

    def score(self, requests: Sequence[Request] | Prepared, *, greedy: bool = False, what: str = "the model") -> Scores:
        """Σ log p of each request's target; in the requests' order. `greedy`: GreedyScores, which also say
        whether each target is the model's greedy continuation (lm-eval's is_greedy).

        Every score is finite, or none is returned: a NaN compares false with everything, so that the
        arg-max would pick an item's first candidate, the correct one, and a NaN model would score
        perfectly. `what` (the model and task) names them in the error. Requests too long for the model
        are an error too (leave their items out first: `vlmerge.evaluate.run.fitting`).
        """
        p = requests if isinstance(requests, Prepared) else self.prepare(requests)
        if p.too_long.size:
            raise VlmergeError(f"{what}: {p.too_long.size} request(s) longer than {self.max_tokens} tokens "
                               f"(eval.max_tokens; the first: request {p.too_long[0]})")
        sums, misses = [], []
        # CPU: the scored sequences are short (tens of tokens): there SDPA's math kernel (in fp32 for
        # bf16 inputs) is faster than its flash kernel, whose tiling is made for long ones. GPU: the
        # tree mask rules flash out; the memory-efficient kernel takes it.
        kernels = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH] if self._cuda else [SDPBackend.MATH]
        with torch.inference_mode(), sdpa_kernel(kernels):
            for b in p.batches:
                inputs = {"input_ids": self._to_device(b.ids), "position_ids": self._to_device(b.positions),
                          "attention_mask": tree_mask(self._to_device(b.segments))}
                if self.use_image:
                    inputs["pixel_values"] = self._features(b.images)
                # A boolean logits_to_keep gives the logits of the True positions only, flattened.
                logits = self.model(**inputs, logits_to_keep=self._to_device(b.keep)).logits
                rows, targets, owners = map(self._to_device, (b.rows, b.targets, b.owners))
                lp = target_logprobs(logits, rows, targets)
                total = torch.zeros(len(b.requests), dtype=torch.float64, device=self.device)
                sums.append(total.index_add_(0, owners, lp.double()))
                if greedy:  # the scored tokens that are not the argmax of their logits, per sequence
                    wrong = (logits.argmax(-1)[rows] != targets).double()
                    misses.append(torch.zeros_like(total).index_add_(0, owners, wrong))
        order = np.concatenate([b.requests for b in p.batches]) if p.batches else np.zeros(0, dtype=np.int64)
        sequences = np.zeros(len(p.owners))
        if sums:  # one copy back, after every batch is queued
            sequences[order] = torch.cat(sums).cpu().numpy()
        # a request of one sequence gets its sum as it is (0 + x is x); a word by subword, its subwords' sum
        logprob = np.bincount(p.owners, weights=sequences, minlength=len(p.requests))
        bad = np.flatnonzero(~np.isfinite(logprob))
        if bad.size:
            raise VlmergeError(f"{what}: {bad.size} of {len(logprob)} scores are NaN or infinite (the first: request "
                               f"{bad[0]}); the model's weights, the image features or the merge give no finite "
                               "log-probabilities, so no candidate can be chosen")
        tokens = np.array(p.target_lengths, dtype=np.int64)
        if not greedy:
            return Scores(logprob, tokens)
        wrong = np.zeros(len(p.owners))
        if misses:
            wrong[order] = torch.cat(misses).cpu().numpy()
        return GreedyScores(logprob, tokens, np.bincount(p.owners, weights=wrong, minlength=len(p.requests)) == 0)

    def _features(self, images: list[str | None]) -> torch.Tensor:
        """The pixel values of a batch on the device: `[B, D]`, or `[B, K, D]` for K image tokens per
        image (the null feature where a row has no image)."""
        out = self._null.expand(len(images), *self._null.shape).clone()
        named = [(row, img) for row, img in enumerate(images) if img is not None]
        if named:
            rows = self.features.rows(np.array([img for _, img in named]))
            if (rows < 0).any():
                missing = named[int(np.flatnonzero(rows < 0)[0])][1]
                raise VlmergeError(f"image {missing!r} has no feature in the store")
            host = self.features.features[rows].float()
            out[[row for row, _ in named]] = self._to_device(host.pin_memory() if self._cuda else host)
        return out
