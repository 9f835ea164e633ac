"""Student-stage data: webdataset samples joined with their cached teacher signals by key.

    ds = DistillDataset(shards="data/train", cache=CacheReader("cache"), processor=StudentProcessor.of(student),
                        template="v1", max_length=2048)
    loader = DataLoader(ds, batch_size=8, sampler=EpochSampler(len(ds), seed=0), collate_fn=ds.collate)
    for batch, teacher in loader: ...

Lazy on both sides: a sample's image and text are read from its tar by offset, its signals
from its cache shard, only when the sample is asked for. Quantised signals (uint8 / uint4 / uint4b
attention, int8 / int8l44 / int4 features) stay as stored through the DataLoader and collate, codes and
row scales, a quarter of float32's bytes; `TeacherBatch.dequantised()` turns them into float32
wherever the batch is, so after `teacher.to(device)` on the student's device (compute_losses
does it), with the bits the cache reader's numpy decode gives. Samples the extraction skipped are
not in the cache and so not in the data set (`ds.skipped` counts them). Each item is checked
against its cache record: the same content fingerprint (the data did not change) and the
same token ids (the student's tokenizer and template reproduce the teacher's sequence), so
no training step ever pairs a student input with another sample's teacher signals.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from alignkd.cache.codecs import Quantised, dequantise, zero_code
from alignkd.cache.records import SampleSignals
from alignkd.cache_schemas import packed_width
from alignkd.data.batching import BatchModel, VLMBatch
from alignkd.data.images import ImagePreprocessor, PreparedImages
from alignkd.data.random_access import ShardReader
from alignkd.data.shards import decode_sample, expand_shards, sample_fingerprint
from alignkd.data.templates import ConversationTemplate, Encoded, choose_template, collate, encode

__all__ = ["StudentProcessor", "DistillDataset", "TeacherBatch", "EpochSampler", "CacheMismatch"]


class CacheMismatch(ValueError):
    """A data sample and its cache record disagree (one line naming the key and what differs)."""


@dataclass
class StudentProcessor:
    """What turns a sample into student inputs: picklable, so DataLoader workers get a copy.
    `images` is the family's own image preparation (`VLM.images`), the one extraction used."""

    tokenizer: Any
    image_processor: Any
    pad_images: bool
    num_vision_tokens: int | None  # None: per image (dynamic resolution)
    templates: dict[str, ConversationTemplate]  # the model family's
    family: str
    images: ImagePreprocessor

    @classmethod
    def of(cls, vlm: BatchModel) -> StudentProcessor:
        return cls(vlm.tokenizer, vlm.image_processor, vlm.pad_images, vlm.num_vision_tokens, dict(vlm.templates),
                   vlm.family, vlm.images)


@dataclass
class TeacherBatch:
    """Cached teacher signals of one batch, padded like the student's.

    attention: {layer: (B, H_T, Lq, Nv) or (B, Lq, Nv)}; row i of sample b is the text query
        at vision_end + i, `query_mask` (B, Lq) marks real rows.
    vision_features: (B, Nv, D_T); focus: (B, Nv); image_mask: (B,) bool.
    vision_mask: (B, Nv) bool, True at each sample's own vision tokens: with per-image counts
        (dynamic resolution) Nv is the batch's largest and the rest is zero padding.
    topk_ids, topk_logprobs: (N_R, k); tail_logmass: (N_R,) in the order of the student's
        response positions (batch-major, then position).
    attention and vision_features are float32 tensors, or, from a cache with a scaled codec,
        `Quantised` codes and row scales of those shapes until `dequantised()`.
    pixel_values: the teacher's own view of the batch's images (B_img, 3, S_T, S_T), only for a
        recompute cache whose slice runs the teacher's tower on pixels the student's are not
        (`DistillDataset(teacher_images=...)`); None otherwise.
    """

    attention: dict[int, torch.Tensor | Quantised]
    query_mask: torch.Tensor
    vision_features: torch.Tensor | Quantised
    focus: torch.Tensor
    image_mask: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    tail_logmass: torch.Tensor
    vision_mask: torch.Tensor
    pixel_values: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> TeacherBatch:
        """Moved as it is: quantised signals travel as their codes and scales."""
        return TeacherBatch(
            attention={k: v.to(device) for k, v in self.attention.items()},
            **{f: getattr(self, f).to(device) for f in ("query_mask", "vision_features", "focus", "image_mask",
                                                         "topk_ids", "topk_logprobs", "tail_logmass", "vision_mask")},
            pixel_values=None if self.pixel_values is None else self.pixel_values.to(device),
        )

    def dequantised(self) -> TeacherBatch:
        """Every signal in float32 on the device it is on: one dequantise op per quantised array
        (alignkd.cache.codecs.dequantise, bit for bit the numpy decode); float ones as they are."""
        def floats(x: torch.Tensor | Quantised) -> torch.Tensor:
            return dequantise(x) if isinstance(x, Quantised) else x

        return replace(self, attention={k: floats(v) for k, v in self.attention.items()},
                       vision_features=floats(self.vision_features))


class DistillDataset(Dataset):
    """Samples as the student sees them (tokens, preprocessed image) with their cached teacher
    signals, each checked against its cache record.

    keep_in_memory  keep every item once prepared, so later epochs skip reading, decoding,
                    preprocessing and the cache: for data sets that fit in RAM (the demo's
                    4000 images alone are 110 MB as float32). Only useful in the main
                    process: DataLoader workers are restarted each epoch and lose their copies.
    teacher_images  the teacher's image preparation, where a recompute cache's slice runs the
                    teacher's tower on pixels the student's are not (`teacher_slice.images`):
                    each image is prepared both ways, the teacher's in `TeacherBatch.pixel_values`.
    """

    def __init__(self, *, shards: str, cache: Any, processor: StudentProcessor, template: str, max_length: int,
                 keep_in_memory: bool = False, teacher_images: ImagePreprocessor | None = None):
        self.reader = ShardReader(expand_shards(shards))
        self.cache = cache
        self.processor = processor
        self.teacher_images = teacher_images
        self.template = choose_template(processor.templates, template, processor.family)
        self.max_length = max_length
        self.kept: dict[int, dict[str, Any]] | None = {} if keep_in_memory else None
        if cache is None:  # plain supervised training (the demo teacher): every sample, no signals
            self.keys, self.skipped = self.reader.keys(), 0
            return
        cached = set(cache.keys())
        # Order: the data's own order, restricted to what the cache holds (deterministic).
        self.keys = [k for k in self.reader.keys() if k in cached]
        self.skipped = len(self.reader) - len(self.keys)
        missing = cached - set(self.reader.keys())
        if missing:
            example = sorted(missing)[0]
            raise CacheMismatch(f"cache holds {len(missing)} samples not in {shards} (e.g. {example}): "
                                "is this the data set the cache was built from?")

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.kept is None:
            return self._prepare(i)
        if i not in self.kept:
            self.kept[i] = self._prepare(i)  # collate copies what it takes: the item stays as it is
        return self.kept[i]

    def _prepare(self, i: int) -> dict[str, Any]:
        key = self.keys[i]
        sample = decode_sample(self.reader.raw(key))
        p = self.processor
        enc = encode(sample.conversations, template=self.template, tokenizer=p.tokenizer,
                     num_vision_tokens=p.images.count(sample.image) if sample.image else 0,
                     max_length=self.max_length, has_image=sample.image is not None, key=key)
        pixels = p.images([sample.image]) if sample.image else None
        item = {"encoded": enc, "pixels": pixels, "signals": None, "meta": sample.meta}
        if self.cache is None:
            return item
        if self.teacher_images is not None and sample.image:
            item["teacher_pixels"] = self.teacher_images([sample.image]).pixel_values
        signals: SampleSignals = self.cache.get(key, dequantise=False)  # on the student's device, after collate
        if sample_fingerprint(sample) != signals.fingerprint:
            raise CacheMismatch(f"sample {key}: content differs from the cached teacher's input (data changed)")
        if not np.array_equal(np.asarray(enc.input_ids, dtype=np.int32), signals.input_ids):
            raise CacheMismatch(f"sample {key}: the student's token ids differ from the teacher's "
                                "(tokenizer, template or max_length differ)")
        return {**item, "signals": signals}

    def check_sample(self, n: int = 32) -> None:
        """Load n samples spread over the data set; each load checks it against its cache
        record, so a changed data set fails here, before training, not at some later step."""
        for i in np.linspace(0, len(self) - 1, num=min(n, len(self)), dtype=int):
            self[int(i)]

    def collate(self, items: list[dict[str, Any]]) -> tuple[VLMBatch, TeacherBatch | None]:
        encoded: list[Encoded] = [it["encoded"] for it in items]
        text = collate(encoded, pad_id=self.processor.tokenizer.pad_token_id, padding_side="right")
        images = PreparedImages.cat([it["pixels"] for it in items if it["pixels"] is not None])
        batch = VLMBatch(
            keys=text["keys"], input_ids=text["input_ids"], attention_mask=text["attention_mask"],
            response_mask=text["response_mask"], vision_start=text["vision_start"],
            num_vision_tokens=self.processor.num_vision_tokens,
            pixel_values=images.pixel_values if images else None,
            extras={"meta": [it["meta"] for it in items]},
            vision_lengths=text["vision_lengths"], image_inputs=images.extras if images else {},
        )
        if self.cache is None:
            return batch, None
        teacher = _teacher_batch([it["signals"] for it in items], seq_len=batch.input_ids.shape[1],
                                 num_vision=self.processor.num_vision_tokens)
        if self.teacher_images is not None and images is not None:
            teacher.pixel_values = torch.cat([it["teacher_pixels"] for it in items if it["pixels"] is not None])
        return batch, teacher


def _teacher_batch(signals: list[SampleSignals], seq_len: int, num_vision: int | None = None) -> TeacherBatch:
    # The student's tapped block has rows vision_end .. seq_len - 1 of the padded batch; pad the
    # teacher's rows to the same count so the two line up row for row. Vision tokens are padded
    # to the batch's widest sample (a text-only sample has none), at least to the model's fixed
    # count, so that a batch without images has the student's block width too.
    nv = max([s.vision_length for s in signals] + [num_vision or 0])
    dim = signals[0].vision_features.shape[-1]
    lq = max([seq_len - (s.vision_start + s.vision_length) for s in signals if s.vision_start >= 0] or [0])
    attention = {}
    for layer in signals[0].attention:
        blocks = [s.attention[layer] for s in signals]
        lead = blocks[0].shape[:-2]  # (H,) per head, () for the head mean
        attention[layer] = _stacked(blocks, (*lead, lq), nv)
    query_mask = torch.zeros(len(signals), lq, dtype=torch.bool)
    # A recompute cache stores no attention, P^T or focus: they stay empty (B, 0, ...) here and
    # alignkd.recompute fills them on the student's device.
    width = nv if signals[0].attention else 0
    focus = np.zeros((len(signals), width), dtype=np.float32)
    for b, s in enumerate(signals):
        n = len(s.input_ids) - (s.vision_start + s.vision_length) if s.vision_start >= 0 else 0  # Lq of the sample
        query_mask[b, :n] = True
        focus[b, : s.vision_length] = s.focus[: s.vision_length]
    # A fixed-grid producer may hand a text-only sample N_v zero rows of float features; none is kept.
    features = [s.vision_features if isinstance(s.vision_features, Quantised) else s.vision_features[: s.vision_length]
                for s in signals]
    lengths = torch.tensor([s.vision_length for s in signals], dtype=torch.long)
    return TeacherBatch(
        attention=attention,
        query_mask=query_mask,
        vision_features=_stacked(features, (width,), dim),
        focus=torch.from_numpy(focus),
        vision_mask=torch.arange(nv)[None, :] < lengths[:, None],
        image_mask=torch.tensor([s.vision_start >= 0 for s in signals]),
        topk_ids=torch.from_numpy(np.concatenate([s.topk_ids for s in signals])).long(),
        topk_logprobs=torch.from_numpy(np.concatenate([s.topk_logprobs for s in signals])),
        tail_logmass=torch.from_numpy(np.concatenate([s.tail_logmass for s in signals])),
    )


def _stacked(pieces: list, lead: tuple[int, ...], width: int) -> torch.Tensor | Quantised:
    """Per-sample arrays (..., rows, last axis) padded into one (B, *lead, width) batch, each in
    its top-left corner. Float arrays pad with 0; `Quantised` ones stay quantised: codes pad
    with the code of 0, scales with 0, so the padding dequantises to the float path's zeros."""
    if not isinstance(pieces[0], Quantised):
        return torch.from_numpy(_corners([np.asarray(p, dtype=np.float32) for p in pieces], (*lead, width),
                                         np.float32, 0))
    codec = pieces[0].codec
    values = _corners([p.values for p in pieces], (*lead, packed_width(codec, width)), pieces[0].values.dtype,
                      zero_code(codec))
    scale = _corners([p.scale for p in pieces], lead, np.float32, 0)
    return Quantised(codec, torch.from_numpy(values), torch.from_numpy(scale), width)


def _corners(arrays: list[np.ndarray], shape: tuple[int, ...], dtype: Any, fill: int) -> np.ndarray:
    out = np.full((len(arrays), *shape), fill, dtype=dtype)
    for b, a in enumerate(arrays):
        out[(b, *(slice(0, n) for n in a.shape))] = a
    return out


class EpochSampler(Sampler[int]):
    """A permutation per epoch from (seed, epoch), starting `skip` items in (mid-epoch resume).

    Under several training processes each takes its share of every optimiser step: the
    permutation is still the one global order from (seed, epoch) alone, never from the rank
    or the number of processes, and each run of `step_size` consecutive items (one step's
    global batch) is cut into `world_size` equal parts, of which process `rank` takes part
    `rank`. So at every step the processes together see exactly the items one process would
    see, none twice and none left out, and a run resumed with another number of processes
    continues the same global order (`skip` counts global items: a whole number of steps).
    This is the one place STYLE's "seeds from (seed, rank)" does not apply, on purpose.
    """

    def __init__(self, n: int, *, seed: int, epoch: int = 0, skip: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, step_size: int | None = None):
        if world_size > 1 and (step_size is None or step_size % world_size or skip % step_size):
            raise ValueError(f"EpochSampler: {world_size} processes need a step_size divisible by them and a skip "
                             f"of whole steps (step_size {step_size}, skip {skip})")
        self.n, self.seed, self.epoch, self.skip, self.shuffle = n, seed, epoch, skip, shuffle
        self.rank, self.world_size, self.step_size = rank, world_size, step_size

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def mine(self) -> list[int]:
        """The items this process takes, in order."""
        rest = self.order()[self.skip :]
        if self.world_size == 1:
            return rest
        part = self.step_size // self.world_size
        return [item for i, item in enumerate(rest) if (i % self.step_size) // part == self.rank]

    def __iter__(self):
        return iter(self.mine())

    def __len__(self) -> int:
        return len(self.mine()) if self.world_size > 1 else self.n - self.skip
