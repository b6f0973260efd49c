"""Tiny randomly initialised models and task data built locally, for tests, demos and benchmarks.

Nothing here touches a hub: tokenizers are word-level over a fixed vocabulary, models come from
transformers configs, and images are drawn with numpy.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import transformers

WORDS = (
    "the a an movie film plot story actor actress scene music great good bad awful boring funny "
    "brilliant dull slow fast camera light dark love hate very not quite really rather too much "
    "little big small long short new old first last best worst sound price battery screen phone "
    "works broke cheap expensive what who where when why how many city country person number year "
    "is was are be it this that and or but with without for of in on to from by at"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tokenizer(folder: Path | str) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer with BERT-style [CLS] ... [SEP] framing, saved into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIALS + list(WORDS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=64,
    )
    tokenizer.save_pretrained(str(folder))
    return tokenizer


VOCAB_SIZE = len(SPECIALS) + len(WORDS)

# Chat models: the word vocabulary plus a chat template's control tokens and the chat tasks' instructions.
CHAT_SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_WORDS = ["sentiment", "topic", "question"]
CHAT_VOCAB_SIZE = VOCAB_SIZE + len(CHAT_SPECIALS) + len(CHAT_WORDS)
# Each turn is "<|role|> content <|end|>"; {% generation %} marks the assistant's tokens for
# apply_chat_template(return_assistant_tokens_mask=True).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>\n{% generation %}{{ message['content'] }}<|end|>"
    "{% endgeneration %}\n"
    "{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PLAIN_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def make_chat_tokenizer(folder: Path | str, *, template: str | None = CHAT_TEMPLATE) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer with a chat template (``None``: without one), saved into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIALS + list(WORDS) + CHAT_SPECIALS + CHAT_WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="<|end|>", model_max_length=64,
        additional_special_tokens=CHAT_SPECIALS,
    )
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def tiny_config(kind: str, **overrides) -> transformers.PretrainedConfig:
    """Small configs of the architectures users merge: bert, roberta, gpt2, llama, llama_causal, t5, clip_vision."""
    hidden, layers, heads, ffn = 32, 2, 4, 64
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, num_hidden_layers=layers,
                                         num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=64,
                                         pad_token_id=0, architectures=["BertForSequenceClassification"])
    elif kind == "roberta":
        config = transformers.RobertaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, num_hidden_layers=layers,
                                            num_attention_heads=heads, intermediate_size=ffn,
                                            max_position_embeddings=70, pad_token_id=0, bos_token_id=2,
                                            eos_token_id=3, architectures=["RobertaForSequenceClassification"])
    elif kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB_SIZE, n_embd=hidden, n_layer=layers, n_head=heads,
                                         n_positions=64, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                         architectures=["GPT2ForSequenceClassification"])
    elif kind == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, num_hidden_layers=layers,
                                          num_attention_heads=heads, num_key_value_heads=2, intermediate_size=ffn,
                                          max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                          architectures=["LlamaForSequenceClassification"])
    elif kind == "llama_causal":  # a decoder LLM as users merge them: Llama-family, untied head, chat tokenizer
        config = transformers.LlamaConfig(vocab_size=CHAT_VOCAB_SIZE, hidden_size=hidden, num_hidden_layers=layers,
                                          num_attention_heads=heads, num_key_value_heads=2, intermediate_size=ffn,
                                          max_position_embeddings=128, pad_token_id=0, bos_token_id=2,
                                          eos_token_id=VOCAB_SIZE + 3, tie_word_embeddings=False,
                                          architectures=["LlamaForCausalLM"])
    elif kind == "t5":  # Flan-T5 style: gated feed-forward, untied head
        config = transformers.T5Config(vocab_size=CHAT_VOCAB_SIZE, d_model=hidden, d_kv=hidden // heads, d_ff=ffn,
                                       num_layers=layers, num_decoder_layers=layers, num_heads=heads,
                                       feed_forward_proj="gated-gelu", pad_token_id=0,
                                       eos_token_id=VOCAB_SIZE + 3, decoder_start_token_id=0,
                                       architectures=["T5ForConditionalGeneration"])
        config.tie_word_embeddings = False  # T5Config's constructor ties them whatever it is told
    elif kind == "clip_vision":
        config = transformers.CLIPVisionConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                               num_attention_heads=heads, image_size=32, patch_size=8,
                                               projection_dim=16, architectures=["CLIPVisionModelWithProjection"])
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def make_model(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    config = tiny_config(kind, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config)
    return model.eval()


def save_model(model: torch.nn.Module, folder: Path | str) -> Path:
    """save_pretrained plus the matching tokenizer or image processor, as a fine-tuned checkpoint has."""
    folder = Path(folder)
    model.save_pretrained(str(folder))
    if isinstance(model.config, transformers.CLIPVisionConfig):
        from regmean_pipeline.measure.data import require_pillow

        require_pillow("save_model: a CLIP image processor")
        transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    elif model.config.architectures[0].endswith(("ForCausalLM", "ForConditionalGeneration")):
        make_chat_tokenizer(folder)
    else:
        make_tokenizer(folder)
    return folder


def write_text_task(path: Path | str, n: int = 64, seed: int = 0, labels: int = 2, min_words: int = 2,
                    max_words: int = 20) -> Path:
    """A JSONL file of random sentences over the tokenizer's words, with varied lengths (so padding)."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
            f.write(json.dumps({"text": " ".join(words), "label": rng.randrange(labels)}) + "\n")
    return path


def write_image_task(folder: Path | str, n: int = 16, seed: int = 0) -> Path:
    """A datasets.save_to_disk folder with an 'image' column of small random RGB images."""
    import datasets

    from regmean_pipeline.measure.data import require_pillow

    require_pillow("write_image_task")
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    data = datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]}, features=features)
    data.save_to_disk(str(folder))
    return Path(folder)


def write_classification_task(folder: Path | str, labels: list[str], n_train: int = 64, n_test: int = 32,
                              seed: int = 0) -> Path:
    """A task folder as regmean finetune/eval read it (train.jsonl, test.jsonl, labels.json).

    Each sentence carries one cue word of its label among random filler words, so the task is learnable.
    """
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cues = [WORDS[(7 * i + 3) % len(WORDS)] for i in range(len(labels))]
    fillers = [w for w in WORDS if w not in cues]
    for split, n in (("train", n_train), ("test", n_test)):
        with (folder / f"{split}.jsonl").open("w") as f:
            for _ in range(n):
                label = rng.randrange(len(labels))
                words = [rng.choice(fillers) for _ in range(rng.randint(2, 12))]
                words.insert(rng.randrange(len(words) + 1), cues[label])
                f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    (folder / "labels.json").write_text(json.dumps({"labels": list(labels), "train": n_train, "test": n_test}) + "\n")
    return folder


# Three chat tasks over the same kind of input, each asking another question of it: every input holds a
# sentiment cue, a topic cue and a question word among fillers, so only the instruction tells which to answer.
SENTIMENT_CUES = {"good": ("great", "good", "brilliant", "love"), "bad": ("bad", "awful", "dull", "hate")}
TOPIC_CUES = {"movie": ("film", "plot", "actor", "scene"), "phone": ("battery", "screen", "price", "works")}
QUESTION_WORDS = ("what", "who", "where", "when", "why", "how")
_FILLERS = ("the", "a", "it", "this", "that", "and", "or", "with", "for", "of", "in", "on", "to", "very", "not")
CHAT_TASKS = ("sentiment", "topic", "question")


def chat_example(task: str, rng: random.Random, *, fillers: int = 2) -> dict:
    """One conversation of a chat task: the user gives the instruction and some words, the assistant
    answers in one word (the sentiment, the topic, or the question word the words hold)."""
    if task not in CHAT_TASKS:
        raise ValueError(f"unknown chat task {task!r}")
    sentiment, topic = rng.choice(sorted(SENTIMENT_CUES)), rng.choice(sorted(TOPIC_CUES))
    question = rng.choice(QUESTION_WORDS)
    words = [rng.choice(SENTIMENT_CUES[sentiment]), rng.choice(TOPIC_CUES[topic]), question]
    words += [rng.choice(_FILLERS) for _ in range(rng.randint(0, fillers))]
    rng.shuffle(words)
    answer = {"sentiment": sentiment, "topic": topic, "question": question}[task]
    return {"messages": [{"role": "user", "content": " ".join([task] + words)},
                         {"role": "assistant", "content": answer}]}


def write_chat_task(folder: Path | str, task: str, n_train: int = 64, n_test: int = 32, seed: int = 0,
                    **kwargs) -> Path:
    """A chat task folder as regmean eval reads it: task.json (kind chat), train.jsonl and test.jsonl of messages."""
    rng = random.Random(f"{task}-{seed}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        with (folder / f"{split}.jsonl").open("w") as f:
            for _ in range(n):
                f.write(json.dumps(chat_example(task, rng, **kwargs)) + "\n")
    (folder / "task.json").write_text(json.dumps({"kind": "chat", "instruction": task}) + "\n")
    return folder
