"""Data reading and collation: formats, placeholder checks, assistant-only labels, safe truncation."""

from __future__ import annotations

from pathlib import Path

import pytest

from facellm_cli.config import ModelConfig
from facellm_cli.errors import DataError
from facellm_cli.testing.records import describe_records, face_rows, write_jsonl, write_sharegpt
from facellm_cli.train.collate import (
    IGNORE_INDEX,
    Collator,
    ConversationDataset,
    ConversationEncoder,
    Dropped,
    Encoded,
    image_token_ids,
)
from facellm_cli.train.data import read_samples


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    folder = tmp_path_factory.mktemp("faces") / "f"
    return folder, face_rows(folder, 4)


def _lm(path: Path):
    from facellm_cli.models.loader import load_model_and_processor

    return load_model_and_processor(ModelConfig(model=str(path), device="cpu"))


def test_messages_and_sharegpt_read_the_same(faces: tuple[Path, list[dict[str, str]]]) -> None:
    folder, rows = faces
    recs = describe_records(rows, multi_turn=True)
    a = read_samples(write_jsonl(folder / "m.jsonl", recs))
    b = read_samples(write_sharegpt(folder / "s.json", recs))
    assert [s.messages for s in a] == [s.messages for s in b]
    assert [s.images for s in a] == [s.images for s in b]
    assert a[0].images == [folder / rows[0]["file"], folder / rows[1]["file"]]
    assert a[0].id == "rec-0" and b[0].id == "record-0"


def test_placeholder_mismatch_names_the_record(faces: tuple[Path, list[dict[str, str]]]) -> None:
    folder, rows = faces
    recs = describe_records(rows)
    recs[2]["images"].append(rows[3]["file"])
    with pytest.raises(DataError) as e:
        read_samples(write_jsonl(folder / "bad.jsonl", recs))
    assert str(e.value) == (
        "record 'rec-2' (bad.jsonl line 3): 1 <image> placeholder(s) in its messages but 2 image(s) listed; "
        "every image needs exactly one <image> in the text (fix the record or rebuild the dataset)"
    )
    recs = describe_records(rows)
    recs[1]["images"] = ["missing.png"]
    with pytest.raises(DataError, match=r"image not found: .*missing.png \(record 'rec-1', bad2.jsonl line 2\)"):
        read_samples(write_jsonl(folder / "bad2.jsonl", recs))


@pytest.mark.parametrize("family", ["internvl", "qwen2_vl"])
def test_labels_cover_only_assistant_turns_multi_turn(
    family: str, faces: tuple[Path, list[dict[str, str]]], tiny_internvl: Path, tiny_qwen2_vl: Path
) -> None:
    import torch

    folder, rows = faces
    lm = _lm(tiny_internvl if family == "internvl" else tiny_qwen2_vl)
    samples = read_samples(write_jsonl(folder / f"mt-{family}.jsonl", describe_records(rows[:2], multi_turn=True)))
    enc = ConversationEncoder(lm.processor, 4096, image_token_ids(lm.model, lm.processor))
    items = [enc.encode(s) for s in samples]
    assert all(isinstance(x, Encoded) for x in items)
    tok = lm.tokenizer
    for item, sample in zip(items, samples, strict=True):
        supervised = item.labels != IGNORE_INDEX
        # the supervised tokens are exactly the two answers, each with the template's end-of-turn
        text = tok.decode(item.input_ids[supervised])
        answers = [m["content"] for m in sample.messages if m["role"] == "assistant"]
        assert text == "".join(f"{a}<|im_end|>\n" for a in answers)
        # and they form two separate runs (the second user turn in between is masked)
        runs = int((supervised[1:] & ~supervised[:-1]).sum()) + int(supervised[0])
        assert runs == 2
        # no image token and no user text is supervised
        assert not torch.isin(item.input_ids[supervised], torch.tensor(sorted(enc.image_token_ids))).any()
        assert "expression" not in text and "user" not in text

    batch = Collator(tok.pad_token_id)(items)
    assert batch["sample_ids"] == ["rec-0", "rec-1"]
    # our loss (assistant positions only, logits only there) equals the model's own loss on the same labels
    from facellm_cli.train.finetune import make_trainer_class

    inputs = {k: v for k, v in batch.items() if k not in ("labels", "sample_ids")}
    with torch.no_grad():
        ref = lm.model(**inputs, labels=batch["labels"]).loss
    trainer_cls = make_trainer_class()
    fake = trainer_cls.__new__(trainer_cls)  # only compute_loss is exercised: no Trainer set-up needed
    fake._keep_mask_ok = None
    fake.samples_log = None
    with torch.no_grad():
        ours = trainer_cls.compute_loss(fake, lm.model.eval(), dict(batch), num_items_in_batch=None)
    assert fake._keep_mask_ok is True  # the model returned logits for the kept positions only
    assert torch.allclose(ours, ref, atol=1e-5)


def test_truncation_never_cuts_image_tokens(faces: tuple[Path, list[dict[str, str]]], tiny_internvl: Path) -> None:
    folder, rows = faces
    lm = _lm(tiny_internvl)
    samples = read_samples(write_jsonl(folder / "tr.jsonl", describe_records(rows[:2], multi_turn=True)))
    ids = image_token_ids(lm.model, lm.processor)
    full = ConversationEncoder(lm.processor, 4096, ids).encode(samples[0])
    assert isinstance(full, Encoded)
    n = len(full.input_ids)
    import torch

    image_pos = torch.nonzero(torch.isin(full.input_ids, torch.tensor(sorted(ids)))).flatten()
    # cut after the last image token but inside the second answer: kept, truncated
    cut = n - 3
    enc = ConversationEncoder(lm.processor, cut, ids)
    kept = enc.encode(samples[0])
    assert isinstance(kept, Encoded) and kept.truncated and len(kept.input_ids) == cut
    assert torch.equal(kept.input_ids, full.input_ids[:cut]) and enc.stats["truncated"] == 1
    # a cut through the second image's tokens: dropped, with the reason and the length
    enc = ConversationEncoder(lm.processor, int(image_pos[-1]), ids)
    dropped = enc.encode(samples[0])
    assert isinstance(dropped, Dropped) and dropped.length == n and dropped.id == "rec-0"
    assert dropped.reason == f"its image tokens end at position {int(image_pos[-1]) + 1}"
    with pytest.raises(DataError, match="every sample in a batch is longer than the max sequence length"):
        Collator(lm.tokenizer.pad_token_id)([dropped])
    batch = Collator(lm.tokenizer.pad_token_id)([dropped, kept])
    assert batch["sample_ids"] == ["rec-0"] and batch["input_ids"].shape == (1, cut)


def test_cached_dataset_encodes_each_sample_once(faces: tuple[Path, list[dict[str, str]]], tiny_internvl: Path) -> None:
    import torch

    folder, rows = faces
    lm = _lm(tiny_internvl)
    samples = read_samples(write_jsonl(folder / "cache.jsonl", describe_records(rows)))
    ids = image_token_ids(lm.model, lm.processor)
    plain_enc, cached_enc = ConversationEncoder(lm.processor, 4096, ids), ConversationEncoder(lm.processor, 4096, ids)
    plain = ConversationDataset(samples, plain_enc)
    cached = ConversationDataset(samples, cached_enc, cache=True)
    for _epoch in range(3):
        for i in range(len(samples)):
            a, b = plain[i], cached[i]
            assert isinstance(a, Encoded) and isinstance(b, Encoded) and a.id == b.id
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
            assert torch.equal(a.extra_tensors["pixel_values"], b.extra_tensors["pixel_values"])
    # three epochs: the plain dataset encoded every sample three times, the cached one once
    assert plain_enc.stats["encoded"] == 3 * len(samples)
    assert cached_enc.stats["encoded"] == len(samples)
