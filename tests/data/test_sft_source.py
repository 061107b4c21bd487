"""The "sft" data source: synthesis-style shards of chat.encode'd conversations -> rows whose loss_mask is the
encode mask shifted by one (targets on assistant tokens only), exact resume, clear errors, and the trainer's
loss equal to cross entropy over the assistant targets."""

import dataclasses
import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import small
from experiments.configs.base import override
from kimi_jax import chat
from kimi_jax.agentic.synthesis import read_shard
from kimi_jax.chat.template import render_segments
from kimi_jax.data import ROW_KEYS, DataConfig, PackedRowsIterDataset, load_tokenizer, make_train_iterator
from kimi_jax.data.sources import write_token_shard

TOK = load_tokenizer("byte")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
DIALOGUES = [  # (messages, tools)
    ([{"role": "system", "content": "Answer briefly."},
      {"role": "user", "content": "What is the capital of France?"},
      {"role": "assistant", "content": "Paris."},
      {"role": "user", "content": "And of Italy?"},
      {"role": "assistant", "content": "Rome."}], None),
    ([{"role": "user", "content": "Write a haiku about rain."},
      {"role": "assistant", "content": "Soft rain on the roof\nthe gutter hums a low song\nmorning smells of earth"}],
     None),
    ([{"role": "system", "content": "Use the tools."},
      {"role": "user", "content": "Weather in Oslo?"},
      {"role": "assistant", "content": "",
       "tool_calls": [{"id": "c1", "type": "function",
                       "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
      {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 3}'},
      {"role": "assistant", "content": "It is 3 °C in Oslo."}], [WEATHER]),
    ([{"role": "system", "content": "You are a calculator."},
      {"role": "user", "content": "12*12"}, {"role": "assistant", "content": "144"},
      {"role": "user", "content": "sqrt of that?"}, {"role": "assistant", "content": "12"}], None),
    ([{"role": "system", "content": "Translate to German."},
      {"role": "user", "content": "Good morning"}, {"role": "assistant", "content": "Guten Morgen"}], None),
    ([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Say nothing."}], None),  # mask all 0
]
SEQ = 64


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A synthesis-like output directory: two shards of encoded dialogues (records ids + mask, as
    synthesis.run_unit writes them) beside their JSON manifests. -> (directory, [(ids, mask)] in file order)."""
    root = tmp_path_factory.mktemp("sft")
    encoded = [chat.encode(TOK, messages, tools) for messages, tools in DIALOGUES]
    for unit, part in enumerate((encoded[:3], encoded[3:])):
        write_token_shard(root / f"shard-{unit:05d}.array_record", [ids + mask for ids, mask in part])
        (root / f"shard-{unit:05d}.json").write_text(json.dumps({"unit": unit}))
    (root / "summary.json").write_text("{}")
    read = [r for unit in range(2) for r in read_shard(root / f"shard-{unit:05d}.array_record")]
    assert [(list(i), list(m)) for i, m in read] == [(list(i), list(m)) for i, m in encoded]
    return root, encoded


def sft_config(root, **kw):
    return DataConfig(**{**dict(source="sft", paths=(str(root),), seq_len=SEQ, global_batch_size=1, seed=1,
                                shuffle=False, num_epochs=1), **kw})


def lane_pairs(rows):
    """[(input, target, weight)] of a lane's real pairs (segment_ids > 0), in order."""
    return [(int(r["input_ids"][i]), int(r["targets"][i]), float(r["loss_mask"][i]))
            for r in rows for i in np.flatnonzero(r["segment_ids"] > 0)]


def expected_pairs(ids, mask, add_bos):
    t = ([TOK.bos_id] if add_bos else []) + list(ids) + [TOK.eos_id]
    m = ([0] if add_bos else []) + list(mask) + [0]
    return [(t[i], t[i + 1], float(m[i + 1])) for i in range(len(t) - 1)]


@pytest.mark.parametrize("add_bos", [True, False])
def test_rows_carry_the_encode_mask_shifted_by_one(shards, add_bos):
    root, encoded = shards
    it = make_train_iterator(sft_config(root, add_bos=add_bos), process_index=0, process_count=1)
    assert it.fingerprint["num_documents"] == len(DIALOGUES)      # the JSON files of the directory are skipped
    rows = [{k: v[0] for k, v in batch.items()} for batch in it]  # one lane: every document in order
    got = lane_pairs(rows)
    assert got == [p for ids, mask in encoded for p in expected_pairs(ids, mask, add_bos)]
    assert sum(float(r["loss_mask"].sum()) for r in rows) == sum(sum(mask) for _, mask in encoded) > 0
    for r in rows:                                                # padding and non-assistant pairs weigh 0
        assert set(np.unique(r["loss_mask"])) <= {0.0, 1.0}
        assert not r["loss_mask"][r["segment_ids"] == 0].any()
    # the trained targets are exactly the assistant turns' text, each with its closing <|im_end|>
    targets = np.concatenate([r["targets"][r["loss_mask"] > 0] for r in rows])
    assert TOK.decode(targets) == "".join(text for messages, tools in DIALOGUES
                                          for text, is_assistant in render_segments(messages, tools) if is_assistant)
    turns = sum(m["role"] == "assistant" for messages, _ in DIALOGUES for m in messages)
    assert int((targets == TOK.token_to_id("<|im_end|>")).sum()) == turns
    assert not (targets == TOK.eos_id).any()


def test_record_starting_with_bos_gets_no_second_one(tmp_path):
    ids, mask = chat.encode(TOK, *DIALOGUES[0])
    write_token_shard(tmp_path / "a.array_record", [[TOK.bos_id] + ids + [0] + mask])
    batch = next(make_train_iterator(sft_config(tmp_path / "a.array_record", global_batch_size=1, seq_len=512),
                                     process_index=0, process_count=1))
    assert lane_pairs([{k: v[0] for k, v in batch.items()}]) == expected_pairs(ids, mask, add_bos=True)


def test_unsplit_packing_keeps_conversations_whole_and_resumes_exactly():
    """split_documents=False on weighted documents: a document starts a row unless it fits the rest of the
    current one; the pair stream and its weights are unchanged; resume from every row is exact."""
    docs = []
    for ids, mask in (chat.encode(TOK, m, t) for m, t in DIALOGUES * 2):
        docs.append((np.asarray([TOK.bos_id] + ids + [TOK.eos_id], np.int32),
                     np.asarray([0] + mask + [0], np.float32)))
    seq = 160
    assert max(len(t) for t, _ in docs) - 1 > seq > min(len(t) for t, _ in docs)
    ds = PackedRowsIterDataset(grain.MapDataset.source(docs), seq_len=seq, pad_id=TOK.pad_id,
                               split_documents=False)
    rows = list(ds)
    want = [(int(t[i]), int(t[i + 1]), float(w[i + 1])) for t, w in docs for i in range(len(t) - 1)]
    assert lane_pairs(rows) == want
    split_rows = list(PackedRowsIterDataset(grain.MapDataset.source(docs), seq_len=seq, pad_id=TOK.pad_id))
    assert len(rows) > len(split_rows)                            # some rows were padded to keep documents whole
    for r in rows:                                                # every piece but a row's first is a whole document
        for seg in np.unique(r["segment_ids"][r["segment_ids"] > 1]):
            piece = r["input_ids"][r["segment_ids"] == seg]
            assert piece[0] == TOK.bos_id and r["targets"][r["segment_ids"] == seg][-1] == TOK.eos_id
    for k in range(len(rows) + 1):
        it = iter(ds)
        for _ in range(k):
            next(it)
        restored = iter(ds)
        restored.set_state(json.loads(json.dumps(it.get_state())))
        rest = list(restored)
        assert len(rest) == len(rows) - k
        for a, b in zip(rest, rows[k:]):
            for key in ROW_KEYS:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_resume_from_a_saved_state_gives_the_same_next_batch(shards):
    root, _ = shards
    cfg = sft_config(root, shuffle=True, num_epochs=None, global_batch_size=4)
    it = make_train_iterator(cfg, process_index=0, process_count=1)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["fingerprint"]["source"] == "sft"
    assert any(lane["pairs_done"] > 0 for lane in state["lanes"].values())   # a conversation split across rows
    expected = [next(it) for _ in range(3)]
    restored = make_train_iterator(cfg, process_index=0, process_count=1)
    restored.set_state(state)
    for a, b in zip([next(restored) for _ in range(3)], expected):
        for k in ROW_KEYS:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # the same shards read as plain token records are another pipeline
    other = make_train_iterator(dataclasses.replace(cfg, source="array_record", paths=(str(root / "*.array_record"),)),
                                process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"source: \('sft', 'array_record'\)"):
        other.set_state(state)
    unsplit = make_train_iterator(dataclasses.replace(cfg, split_documents=False), process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"split_documents: \(None, False\)"):
        unsplit.set_state(state)


def write_raw_shard(path, records):
    from array_record.python.array_record_module import ArrayRecordWriter
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        writer.write(r)
    writer.close()


@pytest.mark.parametrize("bad, message", [
    (np.arange(7, dtype="<u4").tobytes(), "7 values \\(odd\\) cannot be ids \\+ loss mask"),
    (np.array([65, 66, 0, 2], "<u4").tobytes(), "loss mask value 2 at token 1; the mask must be 0 or 1"),
    (np.array([65, 272, 0, 1], "<u4").tobytes(), "token id 272 at token 1 >= tokenizer vocab 272"),
    (b"\x01\x00\x00\x00\x02\x00", "6 bytes is not a whole number of uint32 values"),
])
def test_bad_records_raise_errors_naming_shard_and_record(tmp_path, bad, message):
    good = np.array(chat.encode(TOK, *DIALOGUES[4])[0] + chat.encode(TOK, *DIALOGUES[4])[1], "<u4").tobytes()
    write_raw_shard(tmp_path / "a.array_record", [good, good])
    write_raw_shard(tmp_path / "b.array_record", [good, bad, good])
    it = make_train_iterator(sft_config(tmp_path, global_batch_size=1), process_index=0, process_count=1)
    with pytest.raises(ValueError, match=f"sft shard {tmp_path / 'b.array_record'}: record 1: {message}"):
        list(it)


def test_train_step_loss_is_cross_entropy_over_assistant_targets(shards):
    """One train step (kimi_jax.train.step, the loop's step with the loop's input: data_input.make_input on the
    config launch/train.py gets from --config.data.source=sft --config.data.paths=DIR) reports as its loss the
    cross entropy of the model's own logits over the assistant targets alone. One device, a 1-layer small model."""
    from kimi_jax.train import data_input, loop
    from kimi_jax.train.step import make_train_step

    root, _ = shards
    config = override(small.get_config(), {
        "model.num_hidden_layers": 1, "mesh.data": 1, "optimizer.name": "adamw",
        "data.source": "sft", "data.paths": (str(root),), "data.seq_len": 128, "data.global_batch_size": 4,
        "data.prefetch": 0})
    cfg = loop.model_config(config.model)
    graphdef, state, tx, lr = loop.init_state(config, cfg, loop.make_mesh(config.mesh, jax.devices()[:1]))
    batch = next(data_input.make_input(config.data, cfg, seed=config.seed))
    mask = batch["loss_mask"].astype(np.float64)
    assert 0 < mask.sum() < (batch["segment_ids"] > 0).sum()      # assistant targets and others in the batch
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    _, metrics = jax.jit(make_train_step(graphdef, cfg, tx, lr, **loop.step_kwargs(config)))(state, batch)

    @jax.jit
    def token_nll(params, b):
        logits, _ = nnx.merge(graphdef, params).forward(b["input_ids"], b["positions"], b["segment_ids"])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, b["targets"][..., None], axis=-1)[..., 0]

    nll = np.asarray(token_nll(state.params, batch), np.float64)
    assistant_ce = float((nll * mask).sum() / mask.sum())
    all_pairs_ce = float(nll[np.asarray(batch["segment_ids"]) > 0].mean())
    np.testing.assert_allclose(float(metrics["loss"]), assistant_ce, rtol=2e-5)
    assert abs(all_pairs_ce - assistant_ce) > 1e-3                 # the mask does change the loss
